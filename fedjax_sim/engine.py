"""The compiled federated round: sample -> batch -> vmapped local training -> aggregate -> server.

One call of the function built by :func:`make_round` runs a whole round as one XLA program::

  cohort ids [C] ──► chunks [C/K, K] ──scan──► per chunk: rows/masks [K,S,B] -> gather x,y
                                                         vmap_K(scan_S(client step)) -> delta [K,...]
                                                         non-finite clients -> weight 0
                                                         aggregator.accumulate (running sum)
                 ──► aggregator.finalize -> pseudo-gradient ──► server optimizer -> ServerState

Peak memory follows the chunk size K, not the cohort size C. Data lives on the device as flat
arrays (:class:`DeviceData`) and is passed as an argument (never closed over, so it is not
baked into the program as a constant).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import server, tree
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.client import make_client_train
from fedjax_sim.data.federated import FederatedData, batch_indices
from fedjax_sim.models.core import Model

# Clients per chunk of the vmapped client axis on CPU. Measured on the 2-core CPU with W1 at
# C=1000 (`python benchmarks/w1_w2.py --chunk-sweep W1:1000`): K=2..8 ran at 1.3-1.5 s/round,
# K=16 at 2.0 s, K=32..64 at 2.2-2.4 s. Per step, a chunk holds K copies of the parameters, their
# gradients and activations; at K=8 the 2NN's are ~13 MB and stay in cache, larger chunks spill
# to memory. Small batched matmuls (the weight gradient contracts over only B=20 examples) are
# bandwidth-bound, so cache residency matters more than batching more clients.
DEFAULT_CHUNK_SIZE = 8


class DeviceData(NamedTuple):
  """A population on the device: flat arrays plus per-client offsets and sizes.

  Attributes:
    x: ``[N, ...]`` features.  y: ``[N]`` labels.
    offsets: ``[P]`` int32 first row of each client.  sizes: ``[P]`` int32 examples per client.
    weights: ``[P]`` float32 aggregation weights p_i.
  """
  x: jax.Array
  y: jax.Array
  offsets: jax.Array
  sizes: jax.Array
  weights: jax.Array


def to_device(data: FederatedData, weights: np.ndarray | None = None) -> DeviceData:
  """Moves a population to the device; ``weights [P]`` are the aggregation weights p_i
  (default: example counts)."""
  w = data.sizes if weights is None else weights
  return DeviceData(jnp.asarray(data.arrays["x"]), jnp.asarray(data.arrays["y"], jnp.int32),
                    jnp.asarray(data.offsets[:-1], jnp.int32), jnp.asarray(data.sizes, jnp.int32),
                    jnp.asarray(w, jnp.float32))


def sample_cohort(key: jax.Array, population: int, cohort_size: int) -> jax.Array:
  """``[cohort_size]`` distinct client positions drawn uniformly from ``[0, population)``."""
  if cohort_size == population:
    return jax.random.permutation(key, population)
  return jax.random.choice(key, population, (cohort_size,), replace=False)


def round_keys(key: jax.Array):
  """Derives (cohort sampling key, local batching key, update-transform key) from a round's key."""
  k_sample, k_batch = jax.random.split(key)
  return k_sample, k_batch, jax.random.fold_in(key, 0x7F)


def transform_updates(transform, key: jax.Array, client_ids: jax.Array, deltas):
  """Applies a per-client update transform to stacked deltas ``[K, ...]``; client i uses
  ``fold_in(key, client_ids[i])``."""
  keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(client_ids)
  return jax.vmap(transform.apply)(deltas, keys, client_ids)


class RoundOutput(NamedTuple):
  """Per-round results: scalar ``metrics`` and ``[C]`` per-client arrays ``clients``."""
  metrics: dict[str, jax.Array]
  clients: dict[str, jax.Array]


def client_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named ``"clients"`` over the first ``num_devices`` devices (default: all).

  On a CPU, several devices come from ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
  (set before JAX starts); each device then runs on its own core.
  """
  devices = jax.devices()[: num_devices or jax.device_count()]
  return jax.sharding.Mesh(np.array(devices), ("clients",))


def make_round(algorithm: Algorithm, model: Model, *, population: int, cohort_size: int,
               max_client_size: int, chunk_size: int | None = None,
               mesh: jax.sharding.Mesh | None = None):
  """Builds ``round_fn(state, data: DeviceData, key) -> (ServerState, RoundOutput)`` (not jitted).

  Args:
    algorithm: the federated algorithm (client/server optimizers, local work, aggregation).
    model: the model.
    population: number of clients P in ``data``.
    cohort_size: clients per round C.
    max_client_size: largest client (fixes the number of local steps S, a static shape).
    chunk_size: clients per vmapped chunk K (default :data:`DEFAULT_CHUNK_SIZE`).
    mesh: optional 1-D mesh (axis ``"clients"``, see :func:`client_mesh`): the cohort's client
      axis is split over its D devices, each folding its share chunk by chunk; the D partial
      aggregator states are then combined (a cross-device reduction). Parameters and data are
      replicated. Results equal the single-device round up to float summation order.
  """
  num_dev = 1 if mesh is None else mesh.devices.size
  per_dev = math.ceil(cohort_size / num_dev)
  num_chunks = math.ceil(per_dev / min(per_dev, chunk_size or DEFAULT_CHUNK_SIZE))
  k = math.ceil(per_dev / num_chunks)   # balanced: C=10, K=8 -> 2 chunks of 5, not 8 + 2
  padded = num_dev * num_chunks * k
  work = algorithm.work
  client_train = jax.vmap(make_client_train(model, algorithm.client_optimizer,
                                            algorithm.regularizer), in_axes=(None, 0, 0, 0))
  agg = algorithm.aggregator
  if agg.validate is not None:
    agg.validate(cohort_size)

  def fold_cohort(params, data, k_batch, k_transform, ids, valid):
    """One device's share: ids/valid ``[1, num_chunks, k]`` -> (aggregator state [1, ...],
    per-client outputs ``[1, num_chunks, k]``)."""

    def chunk(acc, chunk_in):
      cids, cvalid = chunk_in
      sizes = jnp.where(cvalid, data.sizes[cids], 0)
      rows, mask = batch_indices(k_batch, cids, data.offsets[cids], sizes, work, max_client_size)
      rows = jnp.clip(rows, 0, data.y.shape[0] - 1)
      out = client_train(params, data.x[rows], data.y[rows], mask)
      if algorithm.update_transform is not None:
        out = out._replace(delta=transform_updates(algorithm.update_transform, k_transform, cids,
                                                   out.delta))
      finite = jax.vmap(tree.sum_is_finite)(out.delta) & jnp.isfinite(out.metrics["loss_sum"])
      w = jnp.where(finite & cvalid, data.weights[cids], 0.0)
      # Zero the deltas of dropped clients: 0 * NaN would still be NaN in the sum.
      delta = jax.tree.map(
          lambda d: jnp.where(jnp.reshape(w > 0, (-1,) + (1,) * (d.ndim - 1)), d, 0), out.delta)
      return agg.accumulate(acc, delta, w), dict(out.metrics, finite=finite)

    acc, clients = jax.lax.scan(chunk, agg.init(params, num_chunks * k), (ids[0], valid[0]))
    return jax.tree.map(lambda a: a[None], acc), jax.tree.map(lambda a: a[None], clients)

  if mesh is not None:
    spec = jax.sharding.PartitionSpec("clients")
    rep = jax.sharding.PartitionSpec()
    # check_vma=False: the replicated global params seed per-device (varying) scan carries; the
    # varying-axis type check would demand a pcast on every carry for no behavioural difference.
    fold_cohort = jax.shard_map(fold_cohort, mesh=mesh, in_specs=(rep, rep, rep, rep, spec, spec),
                                out_specs=(spec, spec), check_vma=False)

  def round_fn(state: server.ServerState, data: DeviceData, key: jax.Array):
    k_sample, k_batch, k_transform = round_keys(key)
    ids = sample_cohort(k_sample, population, cohort_size).astype(jnp.int32)
    valid = jnp.arange(padded) < cohort_size
    ids = jnp.concatenate([ids, jnp.zeros(padded - cohort_size, jnp.int32)])
    shape = (num_dev, num_chunks, k)
    accs, clients = fold_cohort(state.params, data, k_batch, k_transform, ids.reshape(shape),
                                valid.reshape(shape))
    clients = jax.tree.map(lambda a: a.reshape((padded,) + a.shape[3:])[:cohort_size], clients)
    update, total_w = agg.finalize(agg.combine(accs))
    new_state = server.update(algorithm.server_optimizer, state, update, total_w > 0)

    ok = clients["finite"]
    count = jnp.sum(jnp.where(ok, clients["count"], 0.0))
    metrics = {
        "train_loss": jnp.sum(jnp.where(ok, clients["loss_sum"], 0.0)) / jnp.maximum(count, 1.0),
        "train_accuracy": jnp.sum(jnp.where(ok, clients["correct"], 0.0)) / jnp.maximum(count, 1.0),
        "num_clients": jnp.asarray(cohort_size, jnp.int32),
        "num_nonfinite": jnp.sum(~ok).astype(jnp.int32),
        "total_weight": total_w,
        "update_norm": jnp.sqrt(sum(jnp.sum(u.astype(jnp.float32) ** 2)
                                    for u in jax.tree.leaves(update))),
    }
    clients = {"id": ids[:cohort_size], "loss": clients["loss_sum"] / jnp.maximum(clients["count"], 1),
               "accuracy": clients["correct"] / jnp.maximum(clients["count"], 1),
               "count": clients["count"], "steps": clients["steps"], "finite": ok}
    return new_state, RoundOutput(metrics, clients)

  return round_fn
