"""Simulated attacks on federated training, in one place: data poisoning and Byzantine updates.

Both kinds live here, under :mod:`fedjax_sim.transforms` (most attacks are update transforms):
the data attack shares the update attacks' attacker selection and their registry.

Two kinds of attack, applied in different places:

* **data** attacks rewrite the attackers' local datasets before training (:func:`label_flip`);
  the attackers then train honestly on poisoned data, so their updates have ordinary norms.
* **transform** attacks rewrite the attackers' *updates* after local training
  (:func:`sign_flip_attack`, :func:`scale_attack`, :func:`gaussian_attack`, also exported by
  :mod:`fedjax_sim.transforms`); they plug into ``Algorithm.update_transform``.

Both pick their attackers with :func:`is_attacker` on the client's *position* in the population
(``0 .. P-1``, the id the engine passes to update transforms), so with the same ``fraction`` and
``seed`` a data attack and an update attack poison the same clients. :func:`attackers` lists
them. :data:`ATTACKS` maps a name to how the attack is applied, and :func:`apply_attack` applies
one by name to an ``(algorithm, data)`` pair::

  algo, data = fs.transforms.attacks.apply_attack("sign_flip", algo, data, fraction=0.2,
                                                  factor=4.0)
  fs.run(dataclasses.replace(algo, aggregator=fs.aggregators.coordinate_median()), model, data,
         ...)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim import tree as tree_lib
from fedjax_sim.data.federated import FederatedData
from fedjax_sim.transforms.base import UpdateTransform, chain, stateless

__all__ = ["ATTACKS", "Attack", "apply_attack", "attackers", "check_fraction", "gaussian_attack",
           "is_attacker", "label_flip", "scale_attack", "sign_flip_attack"]


# --- who attacks --------------------------------------------------------------------------------

def is_attacker(client_id: jax.Array, fraction: float, seed: int = 0) -> jax.Array:
  """Whether ``client_id`` is in the seeded attacker set: each id independently with probability
  ``fraction`` (the same ids every round)."""
  return jax.random.uniform(jax.random.fold_in(jax.random.key(seed), client_id)) < fraction


def check_fraction(fraction) -> None:
  """Raises ValueError unless ``0 <= fraction < 1`` (an expected fraction of attackers)."""
  if not 0 <= fraction < 1:
    raise ValueError(f"attacker fraction must lie in [0, 1), got {fraction!r}")


def attackers(num_clients: int, fraction: float, seed: int = 0) -> np.ndarray:
  """``[P]`` bool: which client positions ``0 .. P-1`` are attackers.

  Exactly :func:`is_attacker` evaluated on every position (each client independently with
  probability ``fraction``), so the set matches the update attacks'.

  Raises:
    ValueError: ``fraction`` outside ``[0, 1)`` or ``num_clients < 1``.
  """
  check_fraction(fraction)
  if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) \
      or num_clients < 1:
    raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
  ids = jnp.arange(int(num_clients), dtype=jnp.int32)
  return np.asarray(jax.vmap(lambda c: is_attacker(c, fraction, seed))(ids))


# --- Byzantine update attacks (update transforms) ----------------------------------------------

def _attack(fraction: float, seed: int, rewrite) -> UpdateTransform:
  check_fraction(fraction)

  def apply(delta, key, client_id):
    bad = is_attacker(client_id, fraction, seed)
    new = rewrite(delta, key)
    return jax.tree.map(lambda n, d: jnp.where(bad, n, d).astype(d.dtype), new, delta)
  return stateless(apply)


def sign_flip_attack(fraction: float, factor: float = 1.0, seed: int = 0) -> UpdateTransform:
  """Attackers send ``-factor * delta``."""
  return _attack(fraction, seed, lambda d, k: jax.tree.map(lambda x: -factor * x, d))


def scale_attack(fraction: float, factor: float = 100.0, seed: int = 0) -> UpdateTransform:
  """Attackers send ``factor * delta``."""
  return _attack(fraction, seed, lambda d, k: jax.tree.map(lambda x: factor * x, d))


def gaussian_attack(fraction: float, std: float = 10.0, seed: int = 0) -> UpdateTransform:
  """Attackers send pure Gaussian noise of standard deviation ``std``."""
  def rewrite(d, key):
    leaves, treedef = jax.tree.flatten(d)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([std * tree_lib.random_normal(k, x.shape, x.dtype)
                              for k, x in zip(keys, leaves)])
  return _attack(fraction, seed, rewrite)


# --- data poisoning -----------------------------------------------------------------------------

def label_flip(data: FederatedData, fraction: float, num_classes: int | None = None,
               seed: int = 0) -> FederatedData:
  """Label-flipping data poisoning: attacker clients relabel every example ``y -> K - 1 - y``.

  Attackers are the seeded set of :func:`attackers` (the same clients that
  ``sign_flip_attack(fraction, seed=seed)`` etc. would pick). Honest clients' examples, all
  features but ``"y"``, the offsets and the client ids are unchanged; the input is not modified.

  Args:
    data: the population; needs integer labels ``arrays["y"] [N]``.
    fraction: expected fraction of attackers, ``0 <= fraction < 1``.
    num_classes: K; default ``data.num_classes``, else ``max(y) + 1``.
    seed: attacker-selection seed (as in :func:`is_attacker`).

  Returns:
    A new :class:`~fedjax_sim.data.FederatedData` with the attackers' labels flipped.

  Raises:
    ValueError: bad ``fraction``, no ``"y"`` feature, or labels outside ``[0, K)``.
  """
  check_fraction(fraction)
  if "y" not in data.arrays:
    raise ValueError(f"label_flip needs labels 'y'; data has features {sorted(data.arrays)}")
  y = data.arrays["y"]
  k = num_classes if num_classes is not None else data.num_classes
  if k is None:
    k = int(y.max()) + 1
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
    raise ValueError(f"num_classes must be an integer >= 2, got {k!r}")
  if y.size and (y.min() < 0 or y.max() >= k):
    raise ValueError(f"labels must lie in [0, {k}) to flip them, found range "
                     f"[{int(y.min())}, {int(y.max())}]")
  bad_rows = np.repeat(attackers(data.num_clients, fraction, seed), data.sizes)   # [N]
  new_y = np.where(bad_rows, k - 1 - y, y).astype(y.dtype)
  return FederatedData(dict(data.arrays, y=new_y), data.offsets, data.client_ids,
                       data.num_classes)


# --- the registry -------------------------------------------------------------------------------

class Attack(NamedTuple):
  """How a named attack is applied.

  Attributes:
    kind: ``"data"`` (``make(data, fraction, seed=..., **kw) -> FederatedData``) or
      ``"transform"`` (``make(fraction, seed=..., **kw) -> UpdateTransform``).
    make: the constructor.
    description: one line for tables and docs.
  """
  kind: str
  make: Callable[..., Any]
  description: str


ATTACKS: dict[str, Attack] = {
    "label_flip": Attack("data", label_flip, "attackers train on labels y -> K-1-y"),
    "sign_flip": Attack("transform", sign_flip_attack, "attackers send -factor * delta"),
    "scale": Attack("transform", scale_attack, "attackers send factor * delta"),
    "gaussian": Attack("transform", gaussian_attack, "attackers send N(0, std^2) noise"),
}


def apply_attack(name: str, algorithm, data: FederatedData, fraction: float, seed: int = 0,
                 **kwargs):
  """Applies attack ``name`` of :data:`ATTACKS` to ``(algorithm, data)``.

  A data attack returns a poisoned copy of ``data``; a transform attack returns a copy of
  ``algorithm`` whose ``update_transform`` is the attack, chained *after* any transform the
  algorithm already has (an attacker controls its own client, so it sends its malicious update
  whatever the honest pipeline, e.g. clipping, would have done). ``kwargs`` go to the attack
  (``factor=`` for sign_flip / scale, ``std=`` for gaussian, ``num_classes=`` for label_flip).

  Returns:
    ``(algorithm, data)``, one of them replaced.

  Raises:
    ValueError: unknown ``name`` or bad ``fraction``.
  """
  if name not in ATTACKS:
    raise ValueError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
  attack = ATTACKS[name]
  if attack.kind == "data":
    return algorithm, attack.make(data, fraction, seed=seed, **kwargs)
  t = attack.make(fraction, seed=seed, **kwargs)
  if algorithm.update_transform is not None:
    t = chain(algorithm.update_transform, t)
  return dataclasses.replace(algorithm, update_transform=t), data
