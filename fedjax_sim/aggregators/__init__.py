"""Aggregators: reduce per-client updates ``[C, ...]`` with weights ``[C]`` to one update.

They are streaming ``(init, accumulate, finalize)`` triples so that a cohort can be folded in one
chunk of clients at a time (bounded memory): the engine calls ``accumulate`` once per chunk.
"""
from fedjax_sim.aggregators.base import Aggregator, mean

__all__ = ["Aggregator", "mean"]
