"""Procedural populations: client data generated inside the compiled round from (seed, client id).

A :class:`ProceduralPopulation` stores nothing per client. When the round needs client ``k``'s
examples ``j``, it derives them from ``fold_in(fold_in(seed, k), j)``: the same client id always
yields the same data, and a population of 100,000,000 clients costs no memory. It offers the same
per-client accessors the engine uses on a stored population (:class:`fedjax_sim.engine.DeviceData`):
``client_sizes``, ``client_offsets``, ``client_weights``, ``examples``.

:func:`synthetic_population` is FedProx's Synthetic(alpha, beta) (Li et al. 2020, section 5.1)
with every per-device draw keyed by the client id instead of drawn in sequence.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import tree
from fedjax_sim.data.federated import FederatedData


@flax.struct.dataclass
class ProceduralPopulation:
  """Clients generated on demand.

  Attributes:
    key: the population's PRNG key (its seed).
    num_clients: population size P (static).
    max_client_size: largest number of training examples of a client (static; fixes the number
      of local steps in epoch mode).
    num_classes: label classes (static).
    input_shape: shape of one example's features (static).
    size_fn: ``(key, client_ids [K]) -> [K]`` int32 training-example counts in
      ``1..max_client_size`` (static).
    client_fn: ``(client_key) -> params`` one client's distribution parameters (static).
    examples_fn: ``(client_params, key, n) -> (x [n, *input_shape], y [n])``: the client's
      first ``n`` examples of the stream ``key`` (static). Example j must not depend on ``n``.
    weighting: ``"examples"`` (p_i = size) or ``"uniform"`` (static).
  """
  key: jax.Array
  num_clients: int = flax.struct.field(pytree_node=False)
  max_client_size: int = flax.struct.field(pytree_node=False)
  num_classes: int = flax.struct.field(pytree_node=False)
  input_shape: tuple = flax.struct.field(pytree_node=False)
  size_fn: Callable = flax.struct.field(pytree_node=False)
  client_fn: Callable = flax.struct.field(pytree_node=False)
  examples_fn: Callable = flax.struct.field(pytree_node=False)
  weighting: str = flax.struct.field(pytree_node=False, default="examples")
  het: Any = None   # engine compatibility: procedural clients carry no per-client arrays
  # A client's examples are generated all at once (one PRNG call), so the round asks for a
  # chunk's [K, S, B] rows in one call rather than step by step (which would regenerate them).
  gather_per_step = False
  # Sizes come from size_fn per cohort; no smallest size is known ahead (0: unknown, so the
  # engine compiles every phase width and shuffle bound).
  min_client_size = 0

  # --- the accessors the engine uses (all O(cohort)) ------------------------------------------
  def client_sizes(self, client_ids: jax.Array) -> jax.Array:
    return self.size_fn(self.key, client_ids).astype(jnp.int32)

  def client_offsets(self, client_ids: jax.Array) -> jax.Array:
    return jnp.zeros_like(client_ids)   # rows are example indices within the client

  def client_weights(self, client_ids: jax.Array) -> jax.Array:
    if self.weighting == "uniform":
      return jnp.ones(client_ids.shape, jnp.float32)
    return self.client_sizes(client_ids).astype(jnp.float32)

  def examples(self, client_ids: jax.Array, rows: jax.Array, split: int = 0):
    """``client_ids [K]``, ``rows [K, ...]`` example indices -> ``x [K, ..., *input_shape]``,
    ``y [K, ...]``. ``split`` 0 is training data, 1 test data (other example keys)."""
    def one(cid, r):
      ckey = jax.random.fold_in(self.key, cid)
      # All of the client's examples at once, then a gather: one PRNG call of
      # max_client_size x features per client is far cheaper (and compiles far faster) than a
      # key per example.
      x, y = self.examples_fn(self.client_fn(ckey), jax.random.fold_in(ckey, 1 + split),
                              self.max_client_size)
      r = jnp.clip(r, 0, self.max_client_size - 1)
      return x[r], y[r]
    return jax.vmap(one)(client_ids, rows)

  # --- host-side helpers ---------------------------------------------------------------------
  def materialize(self, client_ids, split: str = "train", examples_per_client: int | None = None
                  ) -> FederatedData:
    """The given clients as a stored :class:`FederatedData` (for evaluation and tests).

    ``split="train"`` gives each client's training examples (its size); ``"test"`` gives
    ``examples_per_client`` (default: its size) held-out examples from the same distribution.
    """
    ids = jnp.asarray(np.asarray(client_ids), jnp.int32)
    sizes = np.asarray(self.client_sizes(ids))
    n = self.max_client_size if examples_per_client is None else int(examples_per_client)
    s = 0 if split == "train" else 1

    def gen(cid):
      ckey = jax.random.fold_in(self.key, cid)
      return self.examples_fn(self.client_fn(ckey), jax.random.fold_in(ckey, 1 + s), n)
    x, y = jax.jit(jax.vmap(gen))(ids)
    x, y = np.asarray(x), np.asarray(y)
    take = sizes if (split == "train" and examples_per_client is None) else np.full(len(sizes), n)
    clients = [{"x": x[i, :take[i]], "y": y[i, :take[i]]} for i in range(len(sizes))]
    return FederatedData.from_clients(clients, np.asarray(client_ids), self.num_classes)


def synthetic_population(num_clients: int, alpha: float = 1.0, beta: float = 1.0, *,
                         iid: bool = False, examples_per_client: int | None = 20,
                         max_client_size: int = 200, seed: int = 0,
                         weighting: str = "examples") -> ProceduralPopulation:
  """FedProx's Synthetic(alpha, beta) as a procedural population of ``num_clients`` clients.

  Client k: ``u_k ~ N(0, alpha)``, ``B_k ~ N(0, beta)``, ``W_k ~ N(u_k, 1) [60, 10]``,
  ``b_k ~ N(u_k, 1) [10]``, ``v_k ~ N(B_k, 1) [60]``; example ``x ~ N(v_k, diag(j^-1.2))``,
  ``y = argmax(W_k^T x + b_k)`` (``iid``: one shared W, b and ``v_k = B_k``). Sizes: a fixed
  ``examples_per_client`` (then also the maximum), or (``None``) the paper's
  ``lognormal(4, 2) + 50`` capped at ``max_client_size``.
  """
  if alpha < 0 or beta < 0:
    raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
  if not isinstance(num_clients, (int, np.integer)) or not 0 < num_clients < 2 ** 31:
    raise ValueError(f"num_clients must be an integer in [1, 2^31), got {num_clients!r}")
  if examples_per_client is not None and not 0 < examples_per_client:
    raise ValueError(f"examples_per_client must be >= 1, got {examples_per_client!r}")
  if examples_per_client is not None:
    max_client_size = int(examples_per_client)
  dim, classes = 60, 10
  std_x = jnp.asarray(np.power(np.arange(1, dim + 1, dtype=np.float64), -0.6), jnp.float32)
  shared = jax.random.key(seed + 7919)

  def size_fn(key, ids):
    if examples_per_client is not None:
      return jnp.full(ids.shape, examples_per_client, jnp.int32)
    z = jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, c), 0)))(ids)
    return jnp.minimum(jnp.exp(4.0 + 2.0 * z).astype(jnp.int32) + 50, max_client_size)

  def client_fn(ckey):
    # One flat draw per client, sliced: separate small draws each cost compile time.
    z = jax.random.normal(jax.random.fold_in(ckey, 0x5EED), (2 + dim * classes + classes + dim,))
    u, bk = alpha * z[0], beta * z[1]
    zw = z[2:2 + dim * classes].reshape(dim, classes)
    zb = z[2 + dim * classes:2 + dim * classes + classes]
    zv = z[2 + dim * classes + classes:]
    if iid:
      g = jax.random.normal(shared, (dim * classes + classes,))
      w, b = g[:dim * classes].reshape(dim, classes), g[dim * classes:]
      v = jnp.full((dim,), bk)
    else:
      w, b, v = u + zw, u + zb, bk + zv
    return w, b, v

  def examples_fn(params, key, n):
    w, b, v = params
    x = v[None, :] + std_x[None, :] * tree.random_normal(key, (n, dim))
    return x, jnp.argmax(x @ w + b[None, :], axis=-1).astype(jnp.int32)

  return ProceduralPopulation(jax.random.key(seed), int(num_clients), int(max_client_size),
                              classes, (dim,), size_fn, client_fn, examples_fn, weighting)
