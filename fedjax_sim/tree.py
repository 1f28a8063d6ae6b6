"""Helpers for stacked pytrees: pytrees whose every leaf has a leading client axis ``C``."""

from __future__ import annotations

import math

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Stacks a list of C pytrees into one pytree with a leading axis ``[C, ...]``."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
  """Inverse of :func:`stack`: ``[C, ...]`` leaves -> a list of C pytrees."""
  leaves, treedef = jax.tree.flatten(tree)
  n = leaves[0].shape[0]
  return [treedef.unflatten([leaf[i] for leaf in leaves]) for i in range(n)]


def weighted_sum(tree: PyTree, weights: jax.Array) -> PyTree:
  """``sum_c weights[c] * tree[c]`` over the leading axis. ``weights``: ``[C]``."""
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), tree)


def where(cond: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leafwise ``jnp.where`` with a scalar condition (used to make masked steps no-ops)."""
  return jax.tree.map(lambda a, b: jnp.where(cond, a, b), on_true, on_false)


def zeros_like(tree: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, tree)


def all_finite(tree: PyTree) -> jax.Array:
  """Scalar bool: every element of every inexact (float/complex) leaf is finite; integer,
  boolean and PRNG-key leaves (optimizer step counts, keys) are finite by nature."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jax.dtypes.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def sum_is_finite(tree: PyTree) -> jax.Array:
  """Scalar bool: the sum of all elements is finite. One cheap reduction that is False whenever
  any element is NaN or +-inf (and also when finite values overflow float32, which for a model
  update is as unusable as NaN)."""
  leaves = jax.tree.leaves(tree)
  return jnp.isfinite(sum(jnp.sum(x.astype(jnp.float32)) for x in leaves)) if leaves else \
      jnp.array(True)


def num_params(tree: PyTree) -> int:
  """Total number of scalars in a pytree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def max_abs_diff(a: PyTree, b: PyTree) -> float:
  """``max |a - b|`` over all leaves (for equivalence tests)."""
  diffs = jax.tree.map(lambda x, y: jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))), a, b)
  return float(max(jax.tree.leaves(diffs)))


def random_normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """``jax.random.normal`` drawn flat and reshaped: the same distribution, but XLA:CPU compiles
  a multi-dimensional threefry draw ~7x slower (measured: a vmapped ``[60, 10]`` draw took 21 s
  to compile, ``[600]`` 3 s), which dominated the compile time of rounds that draw noise."""
  return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


def random_uniform(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32, minval=0.0,
                   maxval=1.0) -> jax.Array:
  """``jax.random.uniform`` drawn flat and reshaped (see :func:`random_normal`)."""
  return jax.random.uniform(key, (math.prod(shape),), dtype, minval, maxval).reshape(shape)
