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
from fedjax_sim.registry import Registry

# Every per-client update transform by name (the command line's [[transforms]] tables); DP's
# local noise is registered by fedjax_sim.privacy.
REGISTRY = Registry("update transform")
for _factory in (clip_by_norm, top_k, stochastic_quantize, hadamard_quantize, sign_flip_attack,
                 scale_attack, gaussian_attack):
  REGISTRY.register()(_factory)

__all__ = ["IDENTITY", "REGISTRY", "UpdateTransform", "attacks", "chain", "clip_by_norm",
           "compression", "gaussian_attack", "hadamard_quantize", "identity", "is_attacker",
           "scale_attack", "sign_flip_attack", "stateless", "stochastic_quantize", "top_k"]
