"""Federated data: ragged storage, partitions, adapters from tables (HF datasets, pandas), built-in
datasets."""
from fedjax_sim.data import adapters, datasets, partition
from fedjax_sim.data.federated import (ClientBatches, FederatedData, LocalWork, aligned_empty,
                                       batch_indices)
from fedjax_sim.data.shakespeare import shakespeare as _shakespeare

datasets.REGISTRY.register()(_shakespeare)

__all__ = ["ClientBatches", "FederatedData", "LocalWork", "aligned_empty", "batch_indices",
           "adapters", "datasets", "partition"]
