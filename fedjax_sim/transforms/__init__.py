"""Per-client update transforms, applied to each client's delta before aggregation.

A transform is a pure per-client function ``(delta, key, client_id) -> delta`` (the engine vmaps
it over the clients of a chunk; ``key`` is the round's transform key folded with the client id,
so a client's randomness does not depend on chunking or devices). They compose with
:func:`chain`, in order. Simulated attacks are transforms too: they rewrite the updates of a
fixed, seeded subset of client ids.
"""
from fedjax_sim.transforms.base import (UpdateTransform, apply_transform, chain, clip_by_norm,
                                        gaussian_attack, is_attacker, scale_attack,
                                        sign_flip_attack)
from fedjax_sim.transforms.compression import hadamard_quantize, stochastic_quantize, top_k
from fedjax_sim.registry import Registry

# Every per-client update transform by name (the command line's [[transforms]] tables); DP's
# local noise is registered by fedjax_sim.privacy.
REGISTRY = Registry("update transform")
for _factory in (clip_by_norm, top_k, stochastic_quantize, hadamard_quantize, sign_flip_attack,
                 scale_attack, gaussian_attack):
  REGISTRY.register()(_factory)

__all__ = ["REGISTRY", "UpdateTransform", "apply_transform", "chain", "clip_by_norm", "gaussian_attack",
           "hadamard_quantize", "is_attacker", "scale_attack", "sign_flip_attack",
           "stochastic_quantize", "top_k"]
