"""The update-transform interface, identity, chaining and clipping (attacks: :mod:`fedjax_sim.transforms.attacks`)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

import optax


EmptyState = optax.EmptyState

PyTree = Any


def _no_state(params):
  del params
  return EmptyState()


def _same_encoding(params):
  del params
  return None


class UpdateTransform(NamedTuple):
  """A per-client rewrite of ONE client's update (the engine vmaps it over the cohort).

  ``apply(delta, key, client_id, state) -> (delta, state)`` and ``init(params) -> state``: ONE
  client's initial state, which the engine stores for the whole population
  (``ServerState.clients.transform``, every leaf ``[P, ...]``) and gathers for the cohort; a
  stateless transform's state is ``EmptyState()`` (build it with :func:`stateless`).

  ``wire_bytes(params) -> int | None``: bytes one client sends for an update shaped like
  ``params`` under this transform's encoding (compression), recorded in the history; ``None``
  when the transform does not change the encoding.
  """
  apply: Callable[[PyTree, jax.Array, jax.Array, Any], tuple[PyTree, Any]]
  init: Callable[[PyTree], Any] = _no_state
  wire_bytes: Callable[[PyTree], int | None] = _same_encoding

  def __call__(self, delta, key, client_id, state=None):
    """``apply`` for one client, from its initial state unless ``state`` is given:
    ``-> (delta, state)``."""
    return self.apply(delta, key, client_id, self.init(delta) if state is None else state)


def stateless(fn: Callable[[PyTree, jax.Array, jax.Array], PyTree],
              wire_bytes: Callable[[PyTree], int | None] = _same_encoding) -> UpdateTransform:
  """The transform of a pure ``fn(delta, key, client_id) -> delta`` (no per-client state)."""

  def apply(delta, key, client_id, state):
    return fn(delta, key, client_id), state

  return UpdateTransform(apply, _no_state, wire_bytes)


def _pass(delta, key, client_id, state):
  del key, client_id
  return delta, state


IDENTITY = UpdateTransform(_pass)


def identity() -> UpdateTransform:
  """The transform that leaves updates as they are (:data:`IDENTITY`, every algorithm's
  default)."""
  return IDENTITY


def chain(*transforms: UpdateTransform) -> UpdateTransform:
  """Applies ``transforms`` in order, each with its own key (``fold_in(key, position)``); the
  state is the tuple of the members' states. The last member that re-encodes the update
  (``wire_bytes`` not ``None``) decides what goes on the wire."""
  transforms = tuple(t for t in transforms if t is not IDENTITY)
  if not transforms:
    return IDENTITY
  if len(transforms) == 1:
    return transforms[0]

  def init(params):
    return tuple(t.init(params) for t in transforms)

  def apply(delta, key, client_id, state):
    new = []
    for i, t in enumerate(transforms):
      delta, s = t.apply(delta, jax.random.fold_in(key, i), client_id, state[i])
      new.append(s)
    return delta, tuple(new)

  def wire_bytes(params):
    for t in reversed(transforms):
      b = t.wire_bytes(params)
      if b is not None:
        return b
    return None

  return UpdateTransform(apply, init, wire_bytes)


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
  return stateless(apply)
