"""Aggregators: reduce per-client updates ``[C, ...]`` with weights ``[C]`` to one update.

They are streaming ``(init, accumulate, finalize)`` triples so that a cohort can be folded in one
chunk of clients at a time (bounded memory): the engine calls ``accumulate`` once per chunk.
Robust aggregators (:mod:`fedjax_sim.aggregators.robust`) that need the whole cohort at once
buffer it (``init`` gets the number of client slots to size the buffer). Secure aggregation
(:mod:`fedjax_sim.aggregators.secure`) sums pairwise-masked fixed-point updates; homomorphic
aggregation (:mod:`fedjax_sim.aggregators.homomorphic`, extra ``he``) adds CKKS ciphertexts.
"""
from fedjax_sim.aggregators.base import Aggregator, mean
from fedjax_sim.aggregators import homomorphic, robust, secure
from fedjax_sim.aggregators.homomorphic import ckks_mean
from fedjax_sim.aggregators.robust import (coordinate_median, krum, norm_bounded_mean,
                                           trimmed_mean)
from fedjax_sim.aggregators.secure import secure_sum
from fedjax_sim.registry import Registry

# Every aggregator by name (the command line's [aggregator] table reaches these).
REGISTRY = Registry("aggregator")
for _factory in (mean, coordinate_median, trimmed_mean, krum, norm_bounded_mean, secure_sum,
                 ckks_mean):
  REGISTRY.register()(_factory)

__all__ = ["REGISTRY", "Aggregator", "ckks_mean", "coordinate_median", "homomorphic", "krum",
           "mean", "norm_bounded_mean", "robust", "secure", "secure_sum", "trimmed_mean"]
