"""FedAvg: Communication-Efficient Learning of Deep Networks from Decentralized Data
(McMahan, Moore, Ramage, Hampson, Agüera y Arcas, AISTATS 2017).

Clients run local SGD from the global model; the server averages the models weighted by
example counts. Written as a server optimizer on the pseudo-gradient ``mean(global - local)``
(Reddi et al. 2021): ``server_optimizer=optax.sgd(1.0)`` is FedAvg exactly, server momentum is
FedAvgM, :func:`fedjax_sim.algorithms.adaptive_server_optimizer` gives the paper's
FedAdam/FedYogi/FedAdagrad (:mod:`fedjax_sim.algorithms.fedopt`; optax's ``adam``/``yogi``/
``adagrad`` are other algorithms, usable here as any optax optimizer).
"""

from __future__ import annotations

import optax

from fedjax_sim.aggregators import Aggregator, mean
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.data.federated import LocalWork
from fedjax_sim.transforms.base import IDENTITY, UpdateTransform


def fedavg(client_optimizer: optax.GradientTransformation | None = None,
           server_optimizer: optax.GradientTransformation | None = None, *,
           local_epochs: int | None = None, local_steps: int | None = None, batch_size: int = 32,
           weighting: str = "examples", drop_stragglers: bool = False,
           shuffle: bool = True, aggregator: Aggregator | None = None,
           update_transform: UpdateTransform | None = None) -> Algorithm:
  """FedAvg.

  Args:
    client_optimizer: local optimizer (default ``optax.sgd(0.05)``), state reset every round.
    server_optimizer: applied to the averaged ``global - local`` (default ``optax.sgd(1.0)``).
    local_epochs: passes over the client's data per round (default 1 unless ``local_steps``
      is given; giving both is an error).
    local_steps: fixed number of local steps per round instead of epochs.
    batch_size: local batch size B.
    weighting: ``"examples"`` (weight = client's example count, the FedAvg paper) or ``"uniform"``.
    drop_stragglers: under simulated heterogeneity (:mod:`fedjax_sim.heterogeneity`), discard the
      updates of clients that stopped part-way, as the FedAvg baseline of the FedProx paper (Li et
      al. 2020) does; by default their partial work is aggregated.
    shuffle: reshuffle each client's examples every pass (default). ``False``: FedJAX-style fixed
      batch order, the client's examples in the order they are stored, every pass (see
      :class:`fedjax_sim.data.federated.LocalWork`); to give each client's batch order
      explicitly, store its examples in that order (``FederatedData.from_partition`` keeps the
      order of each client's index array).
    aggregator: how updates are reduced (default :func:`fedjax_sim.aggregators.mean`; e.g. a
      robust aggregator, or secure aggregation).
    update_transform: per-client rewrite of updates (clipping, compression, attacks; default
      none).
  """
  if local_epochs is None and local_steps is None:
    local_epochs = 1
  return Algorithm(
      name="fedavg",
      client_optimizer=client_optimizer if client_optimizer is not None else optax.sgd(0.05),
      server_optimizer=server_optimizer if server_optimizer is not None else optax.sgd(1.0),
      work=LocalWork(batch_size, local_epochs, local_steps, shuffle),
      weighting=weighting, drop_stragglers=bool(drop_stragglers),
      aggregator=aggregator if aggregator is not None else mean(),
      update_transform=update_transform if update_transform is not None else IDENTITY)
