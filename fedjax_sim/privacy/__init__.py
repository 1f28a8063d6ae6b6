"""Differential privacy: DP-FedAvg (central / local, fixed / adaptive clipping) and accounting.

>>> import fedjax_sim as fs
>>> from fedjax_sim import privacy
>>> algo = privacy.dp_fedavg(noise_multiplier=1.0, clip_norm=0.5, adaptive=True)
>>> # 100 of 1000 clients per round: fixed-size cohorts, the sampler of fs.run
>>> cb = privacy.privacy_callback(1.0, q=0.1, delta=1e-5, target_epsilon=8.0, population=1000)
>>> # fs.run(algo, model, data, rounds=cb.max_rounds(), cohort_size=100, callback=cb)

The accountant (:mod:`fedjax_sim.privacy.accounting`) needs ``pip install dp-accounting``.
"""
from fedjax_sim.privacy.accounting import (EpsilonCurve, PrivacyCallback, epsilon,
                                           noise_multiplier_for, privacy_callback)
from fedjax_sim.privacy.dp import (clip_tree, current_clip_norm, dp_fedavg, local_gaussian_noise,
                                   update_noise_multiplier)
from fedjax_sim.registry import Registry
from fedjax_sim.transforms import REGISTRY as _TRANSFORMS

# Privacy mechanisms that wrap an algorithm (the command line's [privacy] table):
# factory(base_algorithm, **options) -> Algorithm.
REGISTRY = Registry("privacy mechanism")
REGISTRY.register()(dp_fedavg)
_TRANSFORMS.register()(local_gaussian_noise)

__all__ = ["REGISTRY", "EpsilonCurve", "PrivacyCallback", "clip_tree", "current_clip_norm", "dp_fedavg",
           "epsilon", "local_gaussian_noise", "noise_multiplier_for", "privacy_callback",
           "update_noise_multiplier"]
