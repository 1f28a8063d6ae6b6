"""DP-FedAvg: user-level differential privacy for federated averaging.

Central DP (McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
Models", ICLR 2018): every client's update is clipped to L2 norm ``<= C`` and the server adds
Gaussian noise to the sum of the cohort's clipped updates::

  client i:  delta_i <- delta_i * min(1, C / ||delta_i||)
  server:    update  <- (sum_i delta_i + N(0, (z C)^2 I)) / m       (m = cohort size, fixed)

Dividing by the fixed cohort size ``m`` (not by the number of clients whose update arrived) keeps
the sensitivity of the average at ``C / m``; the noise on the average is ``N(0, (z C / m)^2)`` per
coordinate.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with
Adaptive Clipping", NeurIPS 2021): the clip norm lives in the server state and follows the
``gamma``-quantile of the update norms with the geometric rule::

  client i:  b_i = 1[||delta_i|| <= C]                  (uploaded with the clipped update)
  server:    b~  = (sum_i b_i + N(0, sigma_b^2)) / m
             C   <- C * exp(-eta_C (b~ - gamma))

The noised count costs privacy too. Following the paper (Theorem 1), the model update is noised
with the multiplier ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so that the pair (update, count)
is exactly as private as one Gaussian mechanism with multiplier ``z``: account with ``z``
(:mod:`fedjax_sim.privacy.accounting`). The default ``sigma_b = m / 20`` is the paper's; it needs
``z < 2 sigma_b = m / 10`` (e.g. ``z < 10`` for 100 clients per round).

Local DP (``local=True``): every client clips its own update and adds ``N(0, (z C)^2 I)`` before
it leaves the client (:func:`local_gaussian_noise`, an update transform using the engine's
per-client transform key); the server averages as usual. Each released update is then a Gaussian
mechanism with multiplier ``z`` on its own: no amplification by sampling (the server sees who
took part), so account with sampling probability 1 over the rounds a client takes part in.

What the guarantee covers: the model updates. Uploads of the base algorithm's own hooks
(SCAFFOLD's control variates, FedNova's step counts) and per-client state are not privatized,
so a composition with such an algorithm keeps its mechanics but is not a formal DP guarantee.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.client import with_context_view
from fedjax_sim.transforms.base import (IDENTITY, UpdateTransform, chain, clip_by_norm, global_norm,
                                        stateless)


def _number(name: str, v, *, low: float, low_ok: bool = True, high: float | None = None,
            high_ok: bool = True) -> float:
  """``v`` as a float, or ValueError unless it is a finite number within the bounds."""
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise ValueError(f"{name} must be a finite number, got {v!r}")
  if v < low or (v == low and not low_ok) or (high is not None and
                                              (v > high or (v == high and not high_ok))):
    lo = f"{'[' if low_ok else '('}{low}"
    hi = "inf)" if high is None else f"{high}{']' if high_ok else ')'}"
    raise ValueError(f"{name} must lie in {lo}, {hi}, got {v!r}")
  return float(v)


def clip_tree(delta, clip_norm):
  """``delta * min(1, clip_norm / ||delta||)`` (global L2 norm over all leaves) and ``||delta||``.

  Args:
    delta: ONE client's update (pytree).
    clip_norm: scalar bound C.

  Returns:
    ``(clipped, norm)``: the clipped pytree (same dtypes) and the scalar float32 norm before
    clipping.
  """
  norm = global_norm(delta)
  factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12))
  return jax.tree.map(lambda d: (d * factor).astype(d.dtype), delta), norm


def gaussian_noise_like(key: jax.Array, tree, std):
  """A pytree shaped like ``tree`` of independent ``N(0, std^2)`` entries (leaf dtypes)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  return treedef.unflatten([(std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
                            for k, x in zip(keys, leaves)])


def local_gaussian_noise(noise_multiplier: float, clip_norm: float) -> UpdateTransform:
  """Local DP as an update transform: clip ONE client's update to ``clip_norm`` and add
  ``N(0, (noise_multiplier * clip_norm)^2)`` to every coordinate, drawn from the transform key
  (the round's transform key folded with the client id, so independent across clients and
  rounds and independent of chunking).
  """
  z = _number("noise_multiplier", noise_multiplier, low=0.0)
  c = _number("clip_norm", clip_norm, low=0.0, low_ok=False)

  def apply(delta, key, client_id):
    del client_id
    clipped, _ = clip_tree(delta, c)
    if z == 0:
      return clipped
    return jax.tree.map(jnp.add, clipped, gaussian_noise_like(key, clipped, z * c))
  return stateless(apply)


def _is_mean(aggregator) -> bool:
  return getattr(aggregator.accumulate, "__qualname__", "").startswith("mean.")


def update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
  """Andrew et al. (2021), Theorem 1: the multiplier ``z_delta`` of the model-update noise when
  the clipped count is noised with std ``sigma_b`` and the whole round must be as private as a
  Gaussian mechanism with multiplier ``z``: ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``.

  Raises:
    ValueError: if ``2 sigma_b <= z`` (the count alone would spend the whole budget).
  """
  z, s = noise_multiplier, clipped_count_stddev
  if z == 0:
    return 0.0
  if not 2 * s > z:
    raise ValueError(f"adaptive clipping with noise_multiplier={z} needs clipped_count_stddev > "
                     f"noise_multiplier / 2 = {z / 2}, got {s} (the default is cohort_size / 20)")
  return (z ** -2 - (2 * s) ** -2) ** -0.5


def dp_fedavg(base: Algorithm | None = None, *, noise_multiplier: float, clip_norm: float,
              adaptive: bool = False, target_quantile: float = 0.5, clip_lr: float = 0.2,
              clipped_count_stddev: float | None = None, local: bool = False) -> Algorithm:
  """DP-FedAvg (central or local Gaussian noise; fixed or adaptive clipping) around ``base``.

  ``base``'s optimizers, local work, client program and server step are kept: DP wraps them
  (the clip is applied to the base program's result; ``base.server_finish`` runs after the noise
  is added, on the noised update, so its treatment of the update is post-processing). Its server
  state is nested under ``aux["base"]`` (its program and server step still see their own); the
  current clip norm is ``aux["clip_norm"]`` (see :func:`current_clip_norm`).

  Args:
    base: the algorithm to privatize (default ``fedavg(weighting="uniform")``). Must use uniform
      weighting: DP-FedAvg's sensitivity analysis bounds every client's contribution by the same
      ``C``, so ``fedavg()`` (example weighting) is rejected; pass ``fedavg(...,
      weighting="uniform")``. The result refuses ``client_weights`` in :func:`fedjax_sim.run`
      (``Algorithm.fixed_weighting``, a ValueError). Central DP
      also needs the mean aggregator (a robust aggregator has a different sensitivity).
    noise_multiplier: z >= 0, noise std relative to the clip norm (0: clipping only).
    clip_norm: C > 0, the (initial, if adaptive) L2 clip norm of a client's update.
    adaptive: follow the ``target_quantile`` of update norms (Andrew et al. 2021); central only.
    target_quantile: gamma in [0, 1], the fraction of clients whose update should be unclipped.
    clip_lr: eta_C >= 0, the geometric learning rate of the clip norm (paper default 0.2).
    clipped_count_stddev: sigma_b, std of the noise on the unclipped count (default
      ``cohort_size / 20``, or 0 when ``noise_multiplier == 0``); needs ``2 sigma_b > z``.
    local: local DP (clip and noise on each client, :func:`local_gaussian_noise`) instead of
      central DP. ``base.update_transform`` then runs first, followed by the local noise.

  With central DP the clip is applied in the client program, before ``base.update_transform``
  (the engine runs transforms after the hooks). A fixed clip norm is then re-applied after the
  base transform (``chain(base.update_transform, clip_by_norm(C))``) so the bound still holds;
  with adaptive clipping the transform cannot see the server's current ``C`` and such a
  combination raises.

  Returns:
    an :class:`~fedjax_sim.algorithms.Algorithm` named ``dp_<base>`` (central) or ``ldp_<base>``.

  Raises:
    ValueError: on bad hyperparameters or an incompatible ``base``.
  """
  z = _number("noise_multiplier", noise_multiplier, low=0.0)
  c0 = _number("clip_norm", clip_norm, low=0.0, low_ok=False)
  gamma = _number("target_quantile", target_quantile, low=0.0, high=1.0)
  eta = _number("clip_lr", clip_lr, low=0.0)
  if clipped_count_stddev is not None:
    clipped_count_stddev = _number("clipped_count_stddev", clipped_count_stddev, low=0.0)
    if adaptive:
      update_noise_multiplier(z, clipped_count_stddev)   # raises early when incompatible
  if base is None:
    base = fedavg(weighting="uniform")
  if not isinstance(base, Algorithm):
    raise ValueError(f"base must be an Algorithm, got {type(base).__name__}")
  if base.weighting != "uniform":
    raise ValueError(f"DP-FedAvg needs uniform client weighting (every client's contribution is "
                     f"bounded by the same clip norm); base {base.name!r} uses "
                     f"{base.weighting!r}: build it with weighting='uniform'")
  if local:
    if adaptive:
      raise ValueError("adaptive clipping is a central-DP mechanism (the server noises the "
                       "unclipped count); it cannot be combined with local=True")
    noise = local_gaussian_noise(z, c0)
    return dataclasses.replace(base, name=f"ldp_{base.name}",
                               update_transform=chain(base.update_transform, noise),
                               fixed_weighting=True)

  if not _is_mean(base.aggregator):
    raise ValueError("central DP-FedAvg calibrates its noise to the sensitivity of the mean; "
                     f"base {base.name!r} uses another aggregator")
  transform = base.update_transform
  if transform is not IDENTITY:
    if adaptive:
      raise ValueError("adaptive clipping cannot be combined with an update_transform: the engine "
                       "applies transforms after the client program, where the clip happens, and "
                       "a transform cannot see the server's current clip norm")
    transform = chain(transform, clip_by_norm(c0))

  def server_state_init(params):
    return {"base": base.server_state_init(params), "clip_norm": jnp.asarray(c0, jnp.float32)}

  def client(model, optimizer):
    inner = with_context_view(base.client(model, optimizer),   # the base sees its own state
                              lambda ctx: ctx._replace(server=ctx.server["base"]))

    def final(carry, ctx):
      res = inner.final(carry, ctx)
      clip = ctx.server["clip_norm"] if adaptive else c0
      delta, norm = clip_tree(res.delta, clip)
      # the unclipped indicator b_i is always uploaded (one scalar), only adaptive clipping uses it
      return res._replace(delta=delta, upload={"base": res.upload,
                                               "unclipped": (norm <= clip).astype(jnp.float32)})

    return inner._replace(final=final)

  def server_finish(ctx, update):
    m = ctx.cohort_size
    aux = ctx.state
    clip = aux["clip_norm"]
    # The mean aggregator divides by the number of counted clients (uniform weights): rescale to
    # the fixed denominator m, the estimator with sensitivity C / m.
    counted = ctx.num_counted.astype(jnp.float32)
    update = jax.tree.map(lambda u: u * (counted / m).astype(u.dtype), update)
    k_update, k_count, k_base = jax.random.split(ctx.key, 3)
    sigma_b = 0.0
    z_update = z
    if adaptive:
      sigma_b = clipped_count_stddev if clipped_count_stddev is not None else \
          (m / 20.0 if z > 0 else 0.0)
      z_update = update_noise_multiplier(z, sigma_b)
    if z_update > 0:
      noise = gaussian_noise_like(k_update, update, z_update * clip / m)
      update = jax.tree.map(jnp.add, update, noise)
    new_clip = clip
    if adaptive:
      count = ctx.upload["unclipped"] * counted + sigma_b * jax.random.normal(k_count, ())
      new_clip = clip * jnp.exp(-eta * (count / m - gamma))
    # the base's server step runs on the noised update: post-processing
    update, base_aux = base.server_finish(
        ctx._replace(state=aux["base"], upload=ctx.upload["base"], key=k_base), update)
    return update, {"base": base_aux, "clip_norm": new_clip.astype(jnp.float32)}

  return dataclasses.replace(base, name=f"dp_{base.name}", client=client,
                             update_transform=transform, server_state_init=server_state_init,
                             server_finish=server_finish, fixed_weighting=True)


def current_clip_norm(state) -> float | None:
  """The clip norm a central :func:`dp_fedavg` run will use next round (from a
  :class:`~fedjax_sim.server.ServerState`), or ``None`` if ``state`` is not from one."""
  aux = getattr(state, "aux", None)
  if isinstance(aux, dict) and "clip_norm" in aux:
    return float(aux["clip_norm"])
  return None
