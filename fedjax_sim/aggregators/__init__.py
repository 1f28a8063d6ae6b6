"""Aggregators: reduce per-client updates ``[C, ...]`` with weights ``[C]`` to one update.

They are streaming ``(init, accumulate, finalize)`` triples so that a cohort can be folded in one
chunk of clients at a time (bounded memory): the engine calls ``accumulate`` once per chunk.
Robust aggregators (:mod:`fedjax_sim.aggregators.robust`) that need the whole cohort at once
buffer it (``init`` gets the number of client slots to size the buffer). Secure aggregation
(:mod:`fedjax_sim.aggregators.secure`) sums pairwise-masked fixed-point updates.
"""
from fedjax_sim.aggregators.base import Aggregator, mean
from fedjax_sim.aggregators import robust, secure
from fedjax_sim.aggregators.robust import (coordinate_median, krum, norm_bounded_mean,
                                           trimmed_mean)
from fedjax_sim.aggregators.secure import secure_sum

__all__ = ["Aggregator", "coordinate_median", "krum", "mean", "norm_bounded_mean", "robust",
           "secure", "secure_sum", "trimmed_mean"]
