"""Server optimizers on the averaged client update: FedAvgM (Hsu, Qi, Brown 2019) and
FedAdagrad / FedAdam / FedYogi of "Adaptive Federated Optimization" (Reddi, Charles, Zaheer,
Garrett, Rush, Konečný, Kumar, McMahan, ICLR 2021), Algorithm 2.

All are FedAvg with another server optimizer applied to the pseudo-gradient
``g_t = mean_i(x_t - y_i)`` (the engine's convention: the server descends along ``g_t``). The
adaptive ones are :func:`adaptive_server_optimizer`, our own optax transformation written from
Algorithm 2, in the paper's notation (``Delta_t = -g_t``, the average client change)::

  m_t = beta1 m_{t-1} + (1 - beta1) Delta_t                                 m_{-1} = 0
  FedAdagrad:  v_t = v_{t-1} + Delta_t^2                                    v_{-1} = tau^2
  FedYogi:     v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
  FedAdam:     v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2
  x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)

(all per coordinate; no bias correction). optax's ``adam`` / ``yogi`` / ``adagrad`` are different
algorithms (bias correction, other initial states, ``eps`` inside the root for adagrad, no
momentum in adagrad): pass one as ``server_optimizer=`` to :func:`fedjax_sim.algorithms.fedavg`
to use it instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg

ADAPTIVE = ("adagrad", "adam", "yogi")


class AdaptiveState(NamedTuple):
  """Algorithm 2's server state: first moment ``m`` and second moment ``v`` (pytrees like the
  params)."""
  m: Any
  v: Any


def _check_number(name, v, low, high=None, low_ok=True):
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    raise ValueError(f"{name} must be a number, got {v!r}")
  if v < low or (v == low and not low_ok) or (high is not None and v >= high):
    rng = f"{'[' if low_ok else '('}{low}, {'inf)' if high is None else f'{high})'}"
    raise ValueError(f"{name} must lie in {rng}, got {v!r}")


def adaptive_server_optimizer(kind: str, eta: float, *, beta1: float = 0.9, beta2: float = 0.99,
                              tau: float = 1e-3) -> optax.GradientTransformation:
  """FedAdagrad / FedAdam / FedYogi server update of Reddi et al. (2021), Algorithm 2.

  Takes the pseudo-gradient ``g = x_t - mean(y_i)`` (pytree) and returns the update to add to
  the params, ``eta m_t / (sqrt(v_t) + tau)`` with ``Delta_t = -g`` (equations in the module
  docstring). State: ``m`` starts at 0 and ``v`` at ``tau^2`` (the paper's ``v_{-1} >= tau^2``,
  at its bound), kept in float32 or the params' wider dtype.

  Args:
    kind: ``"adagrad"``, ``"adam"`` or ``"yogi"``.
    eta: server learning rate, > 0.
    beta1: first-moment decay in [0, 1) (Algorithm 2 uses it for all three; ``beta1=0``
      makes FedAdagrad plain Adagrad without momentum).
    beta2: second-moment decay in [0, 1) (Adam, Yogi; unused by Adagrad).
    tau: adaptivity, > 0: ``v``'s initial value is ``tau^2`` and ``tau`` is added to
      ``sqrt(v_t)``.
  """
  if kind not in ADAPTIVE:
    raise ValueError(f"adaptive server optimizer kind must be one of {ADAPTIVE}, got {kind!r}")
  _check_number("server_lr (eta)", eta, 0.0, low_ok=False)
  _check_number("beta1", beta1, 0.0, 1.0)
  _check_number("beta2", beta2, 0.0, 1.0)
  _check_number("tau", tau, 0.0, low_ok=False)
  eta, beta1, beta2, tau = float(eta), float(beta1), float(beta2), float(tau)

  def dtype(p):
    return jnp.promote_types(p.dtype, jnp.float32)

  def init(params):
    return AdaptiveState(jax.tree.map(lambda p: jnp.zeros(p.shape, dtype(p)), params),
                         jax.tree.map(lambda p: jnp.full(p.shape, tau * tau, dtype(p)), params))

  def update(updates, state, params=None):
    del params
    delta = jax.tree.map(lambda g: -g.astype(dtype(g)), updates)
    m = jax.tree.map(lambda m, d: beta1 * m + (1 - beta1) * d, state.m, delta)
    if kind == "adagrad":
      v = jax.tree.map(lambda v, d: v + d * d, state.v, delta)
    elif kind == "adam":
      v = jax.tree.map(lambda v, d: beta2 * v + (1 - beta2) * d * d, state.v, delta)
    else:
      v = jax.tree.map(lambda v, d: v - (1 - beta2) * d * d * jnp.sign(v - d * d), state.v, delta)
    out = jax.tree.map(lambda g, m, v: (eta * m / (jnp.sqrt(v) + tau)).astype(g.dtype),
                       updates, m, v)
    return out, AdaptiveState(m, v)

  return optax.GradientTransformation(init, update)


def _check_lr(server_lr):
  if isinstance(server_lr, bool) or not (isinstance(server_lr, (int, float)) and server_lr > 0):
    raise ValueError(f"server_lr must be a number > 0, got {server_lr!r}")


def _named(name: str, server_optimizer, client_optimizer, kwargs) -> Algorithm:
  return dataclasses.replace(fedavg(client_optimizer, server_optimizer, **kwargs), name=name)


def fedavgm(client_optimizer=None, *, server_lr: float = 1.0, momentum: float = 0.9,
            **kwargs) -> Algorithm:
  """FedAvg with server momentum (``optax.sgd(server_lr, momentum)``); other arguments as
  :func:`fedjax_sim.algorithms.fedavg`."""
  _check_lr(server_lr)
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
  return _named("fedavgm", optax.sgd(server_lr, momentum=momentum), client_optimizer, kwargs)


def _adaptive(kind, client_optimizer, server_lr, beta1, beta2, tau, weighting, kwargs):
  _check_lr(server_lr)
  opt = adaptive_server_optimizer(kind, server_lr, beta1=beta1, beta2=beta2, tau=tau)
  return _named(f"fed{kind}", opt, client_optimizer, dict(kwargs, weighting=weighting))


_DEFAULTS_DOC = """
  Defaults: ``beta1 = 0.9``, ``beta2 = 0.99``, ``tau = 1e-3`` are the values the paper's
  experiments use (it fixes the betas and tunes ``eta`` and ``tau`` per task: take ``server_lr``
  and ``tau`` from its tables for a reproduction); ``weighting="uniform"``: Algorithm 2 averages
  the client changes uniformly, ``Delta_t = (1/|S|) sum_i Delta_i`` (pass ``weighting="examples"``
  for the example-weighted average). Local training is the
  ``client_optimizer`` (default ``optax.sgd(0.05)``); other arguments as
  :func:`fedjax_sim.algorithms.fedavg`. For optax's own optimizer instead, use
  ``fedavg(server_optimizer=optax.<name>(...))`` (a different algorithm, see the module docstring).
"""


def fedadam(client_optimizer=None, *, server_lr: float = 1e-2, beta1: float = 0.9,
            beta2: float = 0.99, tau: float = 1e-3, weighting: str = "uniform",
            **kwargs) -> Algorithm:
  return _adaptive("adam", client_optimizer, server_lr, beta1, beta2, tau, weighting, kwargs)


def fedyogi(client_optimizer=None, *, server_lr: float = 1e-2, beta1: float = 0.9,
            beta2: float = 0.99, tau: float = 1e-3, weighting: str = "uniform",
            **kwargs) -> Algorithm:
  return _adaptive("yogi", client_optimizer, server_lr, beta1, beta2, tau, weighting, kwargs)


def fedadagrad(client_optimizer=None, *, server_lr: float = 1e-1, beta1: float = 0.9,
               tau: float = 1e-3, weighting: str = "uniform", **kwargs) -> Algorithm:
  return _adaptive("adagrad", client_optimizer, server_lr, beta1, 0.0, tau, weighting, kwargs)


fedadam.__doc__ = ("FedAdam: Reddi et al. (2021), Algorithm 2, with Adam's ``v_t = beta2 v_{t-1} "
                   "+ (1 - beta2) Delta_t^2`` (:func:`adaptive_server_optimizer`; "
                   "``server_lr`` is eta).\n" + _DEFAULTS_DOC)
fedyogi.__doc__ = ("FedYogi: Reddi et al. (2021), Algorithm 2, with Yogi's ``v_t = v_{t-1} - (1 - "
                   "beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)`` (:func:`adaptive_server_optimizer`"
                   "; ``server_lr`` is eta).\n" + _DEFAULTS_DOC)
fedadagrad.__doc__ = ("FedAdagrad: Reddi et al. (2021), Algorithm 2, with ``v_t = v_{t-1} + "
                      "Delta_t^2`` and momentum ``beta1`` as in Algorithm 2 (``beta1=0``: without "
                      "momentum) (:func:`adaptive_server_optimizer`; ``server_lr`` is eta; the "
                      "default eta is 0.1).\n" + _DEFAULTS_DOC)
