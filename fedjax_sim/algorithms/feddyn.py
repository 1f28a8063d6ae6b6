"""FedDyn: Federated Learning Based on Dynamic Regularization
(Acar, Zhao, Navarro, Mattina, Whatmough, Saligrama, ICLR 2021), Algorithm 1.

Each client k keeps ``g_k`` (the paper's ``grad L_k(theta_k)``, zeros at first; population-scale
state); the server keeps ``h`` (zeros at first). In round t, with global model ``x = theta^{t-1}``,
each sampled client k in P_t approximately minimises its dynamically regularised objective with
its local optimizer::

    theta_k = argmin_theta  L_k(theta) - <g_k, theta> + alpha/2 ||theta - x||^2
    g_k    <- g_k - alpha (theta_k - x)                 (clients not in P_t keep g_k)

and the server, with m the population size::

    h      <- h - alpha (1/m) sum_{k in P_t} (theta_k - x)
    x      <- (1/|P_t|) sum_{k in P_t} theta_k - h / alpha

In the simulator the client's delta is ``d_k = x - theta_k``, so ``g_k <- g_k + alpha d_k``; the
aggregate is ``u = mean_k d_k``, and ``server_finish`` returns ``u + h/alpha`` with
``h <- h + alpha (|P_t|/m) u``: the default server optimizer ``sgd(1)`` then gives the paper's
``x - u - h/alpha = mean_k theta_k - h/alpha`` exactly.

``alpha > 0`` is an in-state hyperparameter (``Algorithm.hparams``): ``run(hparams={"alpha":
...})`` and sweeps change it without recompiling (it must stay > 0: ``h/alpha``). Deviations,
stated: the argmin is the local optimizer's work (the paper's experiments also solve it with
local SGD epochs); ``|P_t|`` counts the clients whose update counted; the mean over P_t uses the
algorithm's ``weighting`` (default ``"uniform"``, the paper's; with ``"examples"`` it is the
example-weighted mean, and ``h`` uses that mean for ``(1/|P_t|) sum_k``). ``g_k`` is updated
from the client's own ``theta_k``, before any update transform (clipping, compression) rewrites
what it sends.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_sim import tree
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.client import ClientProgram, local_training


def dynamic_regularizer(params, ctx):
  """``-<g_k, params> + alpha/2 ||params - x||^2`` (``g_k = ctx.state``, ``x =
  ctx.global_params``, ``alpha = ctx.hparams["alpha"]``): FedDyn's local objective minus
  ``L_k``."""
  lin = jax.tree.map(lambda p, g: jnp.sum(p * g.astype(p.dtype)), params, ctx.state)
  sq = jax.tree.map(lambda p, x: jnp.sum((p - x) ** 2), params, ctx.global_params)
  return -sum(jax.tree.leaves(lin)) + 0.5 * ctx.hparams["alpha"] * sum(jax.tree.leaves(sq))


def feddyn_client(model, optimizer) -> ClientProgram:
  """Local training on the dynamically regularised objective; ``final`` returns
  ``g_k + alpha (x - theta_k)`` as the client's new state."""
  inner = local_training(dynamic_regularizer)(model, optimizer)

  def final(carry, ctx):
    res = inner.final(carry, ctx)
    alpha = ctx.hparams["alpha"]
    g = jax.tree.map(lambda gk, d: gk + (alpha * d).astype(gk.dtype), ctx.state, res.delta)
    return res._replace(state=g)

  return ClientProgram(inner.init, inner.step, final)


def _dynamic_correction(ctx, update):
  alpha = ctx.hparams["alpha"]
  frac = ctx.num_counted.astype(jnp.float32) / ctx.population        # |P_t| / m
  h = jax.tree.map(lambda h, u: h + (alpha * frac * u).astype(h.dtype), ctx.state, update)
  return jax.tree.map(lambda u, h: u + (h / alpha).astype(u.dtype), update, h), h


def feddyn(client_optimizer: optax.GradientTransformation | None = None,
           server_optimizer: optax.GradientTransformation | None = None, *,
           alpha: float = 0.01, weighting: str = "uniform", **fedavg_kwargs) -> Algorithm:
  """FedDyn (module docstring) with regularisation coefficient ``alpha > 0``; other arguments as
  :func:`fedjax_sim.algorithms.fedavg` (default ``weighting="uniform"``, as in the paper)."""
  if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and 0 < alpha < float("inf")):
    raise ValueError(f"FedDyn alpha must be a finite number > 0, got {alpha!r}")
  base = fedavg(client_optimizer, server_optimizer, weighting=weighting, **fedavg_kwargs)
  return dataclasses.replace(base, name="feddyn", client=feddyn_client,
                             client_state_init=tree.zeros_like, server_state_init=tree.zeros_like,
                             server_finish=_dynamic_correction, hparams={"alpha": float(alpha)})
