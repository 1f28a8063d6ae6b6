"""Per-client update transforms, applied to each client's delta before aggregation.

A transform is a pure per-client function ``(delta, key, client_id) -> delta`` (the engine vmaps
it over the clients of a chunk; ``key`` is the round's transform key folded with the client id,
so a client's randomness does not depend on chunking or devices). They compose with
:func:`chain`, in order. Simulated attacks are transforms too: they rewrite the updates of a
fixed, seeded subset of client ids.
"""
from fedjax_sim.transforms.base import (IDENTITY, UpdateTransform, chain, clip_by_norm, identity,
                                        stateless,
                                        gaussian_attack, is_attacker, scale_attack,
                                        sign_flip_attack)
from fedjax_sim.transforms.compression import hadamard_quantize, stochastic_quantize, top_k

__all__ = ["IDENTITY", "UpdateTransform", "chain", "clip_by_norm", "gaussian_attack", "identity",
           "stateless",
           "hadamard_quantize", "is_attacker", "scale_attack", "sign_flip_attack",
           "stochastic_quantize", "top_k"]
