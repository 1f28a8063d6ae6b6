"""Per-client update transforms, applied to each client's delta before aggregation.

A transform is a pure per-client function ``(delta, key, client_id) -> delta`` (the engine vmaps
it over the clients of a chunk; ``key`` is the round's transform key folded with the client id,
so a client's randomness does not depend on chunking or devices). They compose with
:func:`chain`, in order. Simulated attacks are transforms too: they rewrite the updates of a
fixed, seeded subset of client ids (:mod:`fedjax_sim.transforms.attacks`, which also holds the
label-flip data attack and the registry of attacks).
"""
from fedjax_sim.transforms import attacks, compression
from fedjax_sim.transforms.attacks import (gaussian_attack, is_attacker, scale_attack,
                                           sign_flip_attack)
from fedjax_sim.transforms.base import (IDENTITY, UpdateTransform, chain, clip_by_norm, identity,
                                        stateless)
from fedjax_sim.transforms.compression import hadamard_quantize, stochastic_quantize, top_k

__all__ = ["IDENTITY", "UpdateTransform", "attacks", "chain", "clip_by_norm", "compression",
           "gaussian_attack", "hadamard_quantize", "identity", "is_attacker", "scale_attack",
           "sign_flip_attack", "stateless", "stochastic_quantize", "top_k"]
