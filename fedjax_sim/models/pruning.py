"""Magnitude pruning for weak clients: prune the smallest weights, train under the mask.

* :func:`magnitude_prune` zeroes the smallest-magnitude weights (one *global* threshold over
  all weight matrices by default, or one per layer) and returns the binary mask.
* :func:`masked_optimizer` wraps an optax optimizer so that pruned coordinates never move: give
  it to the clients (and, to be safe with any server optimizer, the server) and the pruned
  weights stay exactly zero through federated training.
* :func:`num_nonzero` counts the non-zero parameters.

Note that XLA executes pruned matrices as dense ones: :func:`fedjax_sim.models.cost.count_flops`
of a pruned model equals the dense count. The saving pruning buys is in parameters (storage,
download to the client with a sparse encoding) and in FLOPs for a sparse kernel, which the
caller can estimate from the per-layer density. Lower-precision compute is
:mod:`fedjax_sim.models.precision`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

SCOPES = ("global", "layer")


def _prunable(x: np.ndarray) -> bool:
  """Weight matrices / kernels (ndim >= 2) are pruned; biases, norms' scales (1-D) are not."""
  return x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating)


def _keep_largest(values: np.ndarray, k_prune: int) -> np.ndarray:
  """Bool mask over flat ``values [n]``: False for the ``k_prune`` smallest (ties: lower index
  pruned first), so exactly ``k_prune`` entries are pruned."""
  keep = np.ones(values.shape, bool)
  keep[np.argsort(values, kind="stable")[:k_prune]] = False
  return keep


def magnitude_prune(params: PyTree, sparsity: float, scope: str = "global"):
  """Magnitude pruning: zero the fraction ``sparsity`` of weights with the smallest ``|w|``.

  Only leaves with ``ndim >= 2`` (dense kernels, conv filters, embeddings) are pruned; 1-D
  leaves (biases, scales) are kept whole, mask all True. With ``scope="global"`` (default, as in
  Han et al. 2015 / Frankle & Carbin 2019's global variant) one threshold is taken over all
  prunable weights together, so exactly ``floor(sparsity * n)`` of the n prunable weights are
  zeroed and layers with many small weights (e.g. an MLP's input layer on image borders) are
  pruned harder. With ``scope="layer"`` every prunable leaf loses ``floor(sparsity * size)`` of
  its own weights. Ties are broken by position, so the count is exact. Runs on the host (numpy),
  once, outside the compiled rounds.

  Args:
    params: the model's params pytree (float leaves).
    sparsity: fraction of prunable weights to zero, ``0 <= sparsity < 1``.
    scope: ``"global"`` or ``"layer"``.

  Returns:
    ``(pruned_params, mask)``: ``pruned_params`` equal ``params`` with the pruned entries set to
    exactly 0 (same dtypes, jax arrays), ``mask`` a pytree of bool jax arrays shaped like
    ``params`` (True = kept).

  Raises:
    ValueError: ``sparsity`` outside ``[0, 1)``, unknown ``scope``, or no prunable leaf.
  """
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
  leaves, treedef = jax.tree.flatten(params)
  leaves = [np.asarray(x) for x in leaves]
  which = [i for i, x in enumerate(leaves) if _prunable(x)]
  if not which:
    raise ValueError("params have no prunable leaf (a floating array with ndim >= 2)")
  masks = [np.ones(x.shape, bool) for x in leaves]
  mags = {i: np.abs(leaves[i].astype(np.float32)).reshape(-1) for i in which}
  if scope == "global":
    flat = np.concatenate([mags[i] for i in which])
    keep = _keep_largest(flat, int(np.floor(sparsity * flat.size)))
    start = 0
    for i in which:
      n = mags[i].size
      masks[i] = keep[start:start + n].reshape(leaves[i].shape)
      start += n
  else:
    for i in which:
      n = mags[i].size
      masks[i] = _keep_largest(mags[i], int(np.floor(sparsity * n))).reshape(leaves[i].shape)
  pruned = [jnp.asarray(np.where(m, x, np.zeros((), x.dtype))) for x, m in zip(leaves, masks)]
  return treedef.unflatten(pruned), treedef.unflatten([jnp.asarray(m) for m in masks])


def apply_mask(params: PyTree, mask: PyTree) -> PyTree:
  """``params`` with the entries where ``mask`` is False set to exactly 0."""
  return jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), jnp.result_type(x))),
                      params, mask)


def masked_optimizer(optimizer: optax.GradientTransformation,
                     mask: PyTree) -> optax.GradientTransformation:
  """``optimizer`` followed by zeroing the updates of pruned coordinates (``mask`` False).

  The final update of a pruned coordinate is exactly 0 whatever the inner optimizer does
  (momentum, weight decay, Adam), so a weight that starts at 0 stays exactly 0 and the update a
  client sends is 0 there as well. The mask is a constant of the compiled round (closed over),
  so it must be shaped like the params. Use it as FedAvg's ``client_optimizer``; as the server
  optimizer too if other clients' updates may be dense (e.g. mixed populations).

  Args:
    optimizer: any optax transformation.
    mask: bool pytree like the params (True = trainable), e.g. from :func:`magnitude_prune`.
  """
  mask = jax.tree.map(lambda m: jnp.asarray(m, bool), mask)

  def zero_pruned(updates, params=None):
    del params
    return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros((), u.dtype)), updates, mask)

  return optax.chain(optimizer, optax.stateless(zero_pruned))


def num_nonzero(params: PyTree) -> int:
  """Number of non-zero entries over all leaves."""
  return int(sum(int(jnp.count_nonzero(x)) for x in jax.tree.leaves(params)))
