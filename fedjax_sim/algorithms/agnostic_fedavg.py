"""Agnostic federated learning: Agnostic Federated Learning (Mohri, Sivek, Suresh, ICML 2019),
as FedJAX's ``agnostic_fed_avg`` runs it (each client belongs to exactly one domain).

The population is split into K domains (``domains[i]`` in ``0..K-1``: e.g. a locale, a device
type). Instead of the average loss, AFL minimises the loss of the worst mixture of domains,
``min_w max_{lambda in simplex} sum_k lambda_k L_k(w)`` with ``L_k`` the mean loss over domain
k's examples. Each round, with ``p_i`` the aggregation weight of client i (its example count by
default), ``d_i`` its domain and ``M_k = sum_{j in domain k} p_j / sum_j p_j`` the share of the
population's weight held by domain k::

    loss at the global model   l_i = mean loss of w on the batches client i's training sees
    per-domain loss            L_k = sum_{i in S, d_i = k} p_i l_i / sum_{i in S, d_i = k} p_i
                               (0 for a domain with no client in the cohort S)
    client scale               s_i = lambda_{d_i} / M_{d_i}
    update                     Delta = sum_{i in S} p_i s_i (w - w_i) / sum_{i in S} p_i s_i
    model                      w <- server_optimizer step on Delta  (sgd(1): w - Delta)
    domain weights (EG)        lambda_k <- lambda_k exp(eta L_k) / sum_j lambda_j exp(eta L_j)

``w_i`` is client i's model after local training from ``w``; ``eta`` is the in-state
hyperparameter ``domain_learning_rate`` (sweepable; 0 freezes lambda: FedAvg with fixed domain
weights). The final lambda and the round's ``L`` are ``RunResult.state.aux``
(:class:`AFLState`).

How it is computed: the client program runs local training plus one extra forward pass per step
at the global model (for ``l_i``), scales its delta by ``s_i`` (it reads lambda from
``ctx.server``) and uploads ``s_i``, its one-hot domain and ``l_i`` times it; ``server_finish``
divides the aggregate by the uploaded mean of ``s_i`` and updates lambda.

Deviations from FedJAX, stated:
- FedJAX weights client i by ``lambda_{d_i} n_i / N_{d_i}`` with ``N_k`` the examples of domain k
  *in the cohort*. That needs the cohort's per-domain totals before aggregation, which a round
  with one running, params-shaped accumulator does not have; the population share ``M_k``
  (known up front) is used instead. Both estimate the paper's ``sum_k lambda_k grad L_k``; they
  are equal when the cohort is the whole population (and for K = 1, where AFL is FedAvg).
- ``l_i`` is measured on the batches local training draws (one pass over the client's data per
  local epoch), not a separate evaluation pass: with ``local_epochs`` it is the client's mean
  training loss at ``w``, as in FedJAX.
- Update transforms (clipping, compression, DP) see the scaled delta ``s_i (w - w_i)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.algorithms.base import Algorithm, ServerContext
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.client import ClientProgram, ClientResult, local_training


class AFLState(NamedTuple):
  """AFL's server state (``ServerState.aux``): ``domain_weights`` lambda ``[K]`` (on the simplex)
  and ``domain_loss`` ``[K]``, the per-domain loss L of the last round (0 where absent)."""
  domain_weights: jax.Array
  domain_loss: jax.Array


class AFLUpload(NamedTuple):
  scale: jax.Array      # s_i
  present: jax.Array    # [K] one-hot domain (0 for a client without examples)
  loss: jax.Array       # [K] one-hot domain times l_i


class AFLCarry(NamedTuple):
  local: Any
  loss_sum: jax.Array   # loss of the global model summed over the examples seen
  count: jax.Array


def _int_vector(name: str, v) -> np.ndarray:
  a = np.asarray(v)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"agnostic_fedavg: {name} must be a non-empty 1-D array [P] (one entry per "
                     f"client), got shape {a.shape}")
  return a


def _domain_mass(domains: np.ndarray, num_domains: int, weights: np.ndarray) -> np.ndarray:
  mass = np.bincount(domains, weights=weights, minlength=num_domains).astype(np.float64)
  return (mass / max(mass.sum(), 1e-30)).astype(np.float32)


def afl_client(domains: jax.Array | None, mass: jax.Array):
  """The AFL client program (module docstring) for ``domains [P]`` (``None``: one domain) and
  domain shares ``mass [K]``."""
  num_domains = mass.shape[0]

  def factory(model, optimizer) -> ClientProgram:
    inner = local_training()(model, optimizer)

    def init(ctx):
      zero = jnp.zeros((), jnp.float32)
      return AFLCarry(inner.init(ctx), zero, zero)

    def step(carry, batch, ctx, key):
      _, (loss_sum, _, count) = model.batch_loss(ctx.global_params, batch.x, batch.y, batch.mask)
      return AFLCarry(inner.step(carry.local, batch, ctx, key),
                      carry.loss_sum + loss_sum.astype(jnp.float32),
                      carry.count + count.astype(jnp.float32))

    def final(carry, ctx):
      res = inner.final(carry.local, ctx)
      d = jnp.zeros((), jnp.int32) if domains is None else domains[ctx.client_id]
      scale = ctx.server.domain_weights[d] / jnp.maximum(mass[d], 1e-30)
      delta = jax.tree.map(lambda x: x * scale.astype(x.dtype), res.delta)
      present = jax.nn.one_hot(d, num_domains, dtype=jnp.float32) * (carry.count > 0)
      loss = carry.loss_sum / jnp.maximum(carry.count, 1.0)
      metrics = dict(res.metrics, domain=d, global_loss=loss)
      return ClientResult(delta, res.state, AFLUpload(scale, present, present * loss), metrics)

    return ClientProgram(init, step, final)

  return factory


def agnostic_fedavg(client_optimizer: optax.GradientTransformation | None = None,
                    server_optimizer: optax.GradientTransformation | None = None, *,
                    domains=None, num_domains: int | None = None, client_weights=None,
                    init_domain_weights=None, domain_learning_rate: float = 0.1,
                    weighting: str = "examples", **fedavg_kwargs) -> Algorithm:
  """Agnostic FedAvg (module docstring).

  Args:
    domains: ``[P]`` int domain id of every client of the population, in population order
      (client id i is ``domains[i]``; checked against the population when the round is built).
      ``None``: every client in domain 0 (AFL with one domain is FedAvg).
    num_domains: K (default ``max(domains) + 1``).
    client_weights: ``[P]`` the aggregation weights ``p_i`` of the run, from which the domain
      shares ``M_k`` are computed: ``data.sizes`` for ``weighting="examples"`` (required there
      when K > 1), or the ``client_weights`` given to ``run``. Default with
      ``weighting="uniform"``: ones.
    init_domain_weights: ``[K]`` initial lambda (non-negative, normalised; default uniform).
    domain_learning_rate: eta of the exponentiated-gradient step on lambda (an in-state
      hyperparameter ``domain_learning_rate``, sweepable).
    weighting, **fedavg_kwargs: as :func:`fedjax_sim.algorithms.fedavg`.
  """
  if domains is None:
    if num_domains not in (None, 1):
      raise ValueError(f"agnostic_fedavg: num_domains={num_domains} needs domains=[P] ids")
    dom, k = None, 1
  else:
    dom = _int_vector("domains", domains)
    if not np.issubdtype(dom.dtype, np.integer):
      raise ValueError(f"agnostic_fedavg: domains must be integers, got dtype {dom.dtype}")
    k = int(dom.max()) + 1 if num_domains is None else num_domains
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"agnostic_fedavg: num_domains must be a positive integer, got {k!r}")
    if dom.min() < 0 or dom.max() >= k:
      raise ValueError(f"agnostic_fedavg: domain ids must lie in [0, {k}), got "
                       f"[{dom.min()}, {dom.max()}]")
  if init_domain_weights is None:
    lam0 = np.full(k, 1.0 / k)
  else:
    lam0 = np.asarray(init_domain_weights, np.float64)
    if lam0.shape != (k,) or not np.all(np.isfinite(lam0)) or lam0.min() < 0 or lam0.sum() <= 0:
      raise ValueError(f"agnostic_fedavg: init_domain_weights must be [{k}] non-negative with a "
                       f"positive sum, got {np.asarray(init_domain_weights)!r}")
    lam0 = lam0 / lam0.sum()
  if dom is None:
    mass, population = np.ones(1, np.float32), None
  else:
    population = dom.shape[0]
    if client_weights is None:
      if weighting == "examples" and k > 1:
        raise ValueError("agnostic_fedavg: with weighting='examples' pass client_weights="
                         "data.sizes (the domains' shares of the examples weight the updates)")
      w = np.ones(population)
    else:
      w = np.asarray(client_weights, np.float64)
      if w.shape != (population,) or not np.all(np.isfinite(w)) or w.min() < 0:
        raise ValueError(f"agnostic_fedavg: client_weights must be [{population}] finite and "
                         f">= 0 (one per client, as domains), got shape {w.shape}")
    mass = _domain_mass(dom, k, w)
  domains_dev = None if dom is None else jnp.asarray(dom, jnp.int32)
  mass_dev = jnp.asarray(mass)

  def server_state_init(params):
    del params
    return AFLState(jnp.asarray(lam0, jnp.float32), jnp.zeros(k, jnp.float32))

  def server_finish(ctx: ServerContext, update):
    if population is not None and ctx.population != population:
      raise ValueError(f"agnostic_fedavg: domains has {population} entries but the population "
                       f"has {ctx.population} clients")
    up = ctx.upload
    scale = jnp.maximum(up.scale, 1e-30)
    update = jax.tree.map(lambda u: u / scale.astype(u.dtype), update)
    loss = jnp.where(up.present > 0, up.loss / jnp.maximum(up.present, 1e-30), 0.0)
    # exponentiated gradient: multiply by exp(eta L), renormalise (shifted by max for overflow)
    logits = jnp.log(ctx.state.domain_weights) + ctx.hparams["domain_learning_rate"] * loss
    lam = jax.nn.softmax(logits)
    return update, AFLState(lam.astype(jnp.float32), loss.astype(jnp.float32))

  base = fedavg(client_optimizer, server_optimizer, weighting=weighting, **fedavg_kwargs)
  return dataclasses.replace(base, name="agnostic_fedavg", client=afl_client(domains_dev, mass_dev),
                             server_state_init=server_state_init, server_finish=server_finish,
                             hparams={"domain_learning_rate": float(domain_learning_rate)})
