"""FedBuff: Federated Learning with Buffered Asynchronous Aggregation (Nguyen, Malik, Zhan,
Yousefpour, Rabbat, Malek, Huba, AISTATS 2022).

M clients train concurrently, each from the model version current when it started; the server
keeps a buffer and, every K arrivals, applies ``x <- x - eta_g * (1/K) sum_k g(s_k) delta_k``
with ``delta = start - local`` and staleness ``s_k`` = server updates since client k started,
``g(s) = 1/sqrt(1+s)``. Simulated by :mod:`fedjax_sim.asynchronous` (run it with
:func:`fedjax_sim.asynchronous.run_async`); ``server_optimizer=optax.sgd(eta_g)`` is the paper's
server step, other optax optimizers give server momentum / Adam on the buffered update.
"""

from __future__ import annotations

import optax

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.asynchronous import AsyncConfig, DurationModel
from fedjax_sim.data.federated import LocalWork


def fedbuff(client_optimizer: optax.GradientTransformation | None = None,
            server_optimizer: optax.GradientTransformation | None = None, *,
            buffer_size: int = 10, concurrency: int = 100, max_staleness: int = 100,
            staleness: str = "sqrt", staleness_exponent: float = 0.5,
            aggregation: str = "mean", restart: str = "arrival",
            local_epochs: int | None = None, local_steps: int | None = None,
            batch_size: int = 32, weighting: str = "uniform",
            duration: DurationModel | None = None) -> AsyncConfig:
  """FedBuff.

  Args:
    client_optimizer: local optimizer (default ``optax.sgd(0.05)``), fresh state every job.
    server_optimizer: applied to the buffered update (default ``optax.sgd(1.0)``: eta_g = 1).
    buffer_size: K, client updates per server step.
    concurrency: M >= K, clients training at any time. New clients are drawn uniformly from
      those not in flight, so slow clients (in flight longer) are drawn less often than fast
      ones, as in a real deployment; with M close to the population a freed client is mostly
      restarted itself.
    max_staleness: H, model versions kept (a ring of H copies of the params); arrivals with
      staleness >= H are dropped and counted (``num_stale_dropped``).
    staleness: ``"sqrt"`` (``1/sqrt(1+s)``, the paper), ``"constant"`` (1) or ``"poly"``
      (``(1+s)^-staleness_exponent``).
    staleness_exponent: exponent of ``"poly"``.
    aggregation: ``"mean"``: ``sum_k p_k g(s_k) delta_k / sum_k p_k`` over the counted arrivals
      (the paper's ``(1/K) sum_k g(s_k) delta_k`` with uniform weights and nothing dropped: stale
      updates shrink the step); ``"normalized"``: ``/ sum_k p_k g(s_k)`` (a weighted mean).
    restart: ``"arrival"`` (the paper's system: a new client starts as soon as one finishes, so
      M stay in flight) or ``"update"`` (the K freed slots restart at the server update).
    local_epochs: local passes per job (default 1 unless ``local_steps`` is given).
    local_steps: fixed local steps per job instead of epochs.
    batch_size: local batch size B.
    weighting: per-client weights p_i: ``"uniform"`` (the paper) or ``"examples"``.
    duration: simulated client durations (default :class:`DurationModel()`).

  Raises:
    ValueError: for ``K <= 0``, ``K > M``, ``H <= 0`` or an unknown option.
  """
  if local_epochs is None and local_steps is None:
    local_epochs = 1
  algorithm = Algorithm(
      name="fedbuff",
      client_optimizer=client_optimizer if client_optimizer is not None else optax.sgd(0.05),
      server_optimizer=server_optimizer if server_optimizer is not None else optax.sgd(1.0),
      work=LocalWork(batch_size, local_epochs, local_steps),
      weighting=weighting)
  return AsyncConfig(name="fedbuff", algorithm=algorithm, buffer_size=buffer_size,
                     concurrency=concurrency, max_staleness=max_staleness, staleness=staleness,
                     staleness_exponent=staleness_exponent, aggregation=aggregation,
                     restart=restart,
                     duration=duration if duration is not None else DurationModel())
