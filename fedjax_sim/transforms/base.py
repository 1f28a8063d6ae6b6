"""The update-transform interface, clipping, and simulated Byzantine attacks."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim import tree as tree_lib

PyTree = Any


class UpdateTransform(NamedTuple):
  """A per-client rewrite of ONE client's update (the engine vmaps it over the cohort).

  Stateless (``init is None``): ``apply(delta, key, client_id) -> delta``.
  Stateful (e.g. error feedback): ``init(params) -> state`` gives ONE client's initial state (the
  engine stores it for the whole population, ``ServerState.clients["transform"]``, and gathers
  the cohort's rows) and ``apply(delta, key, client_id, state) -> (delta, state)``.

  ``wire_bytes(params) -> int``, optional: bytes one client sends for an update shaped like
  ``params`` under this transform's encoding (compression); recorded in the history. Transforms
  that do not change the encoding leave it ``None``.
  """
  apply: Callable[..., Any]
  init: Callable[[PyTree], Any] | None = None
  wire_bytes: Callable[[PyTree], int] | None = None


def apply_transform(t: UpdateTransform, delta, key, client_id, state=None):
  """Uniform call for both kinds: ``-> (delta, state)`` (state ``None`` when stateless)."""
  if t.init is None:
    return t.apply(delta, key, client_id), state
  return t.apply(delta, key, client_id, state)


def chain(*transforms: UpdateTransform) -> UpdateTransform:
  """Applies ``transforms`` in order, each with its own key (``fold_in(key, position)``). The
  chain is stateful if any member is; its state is the tuple of the members' states."""
  stateful = [t.init is not None for t in transforms]
  # The last transform that re-encodes the update decides what goes on the wire.
  encoders = [t.wire_bytes for t in transforms if t.wire_bytes is not None]
  wire = encoders[-1] if encoders else None
  if not any(stateful):
    def apply(delta, key, client_id):
      for i, t in enumerate(transforms):
        delta = t.apply(delta, jax.random.fold_in(key, i), client_id)
      return delta
    return UpdateTransform(apply, None, wire)

  def init(params):
    return tuple(t.init(params) if t.init is not None else None for t in transforms)

  def apply_stateful(delta, key, client_id, state):
    new = []
    for i, t in enumerate(transforms):
      delta, s = apply_transform(t, delta, jax.random.fold_in(key, i), client_id, state[i])
      new.append(s)
    return delta, tuple(new)
  return UpdateTransform(apply_stateful, init, wire)


def global_norm(tree: PyTree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_norm(max_norm: float) -> UpdateTransform:
  """Scales the update down to L2 norm ``<= max_norm`` (DP-FedAvg's per-client clipping)."""
  if not max_norm > 0:
    raise ValueError(f"clip norm must be > 0, got {max_norm!r}")

  def apply(delta, key, client_id):
    del key, client_id
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(global_norm(delta), 1e-12))
    return jax.tree.map(lambda d: (d * factor).astype(d.dtype), delta)
  return UpdateTransform(apply)
