"""Federated data: ragged storage, partitions, built-in datasets."""
from fedjax_sim.data import datasets, partition
from fedjax_sim.data.federated import (ClientBatches, FederatedData, LocalWork, aligned_empty,
                                       batch_indices)

__all__ = ["ClientBatches", "FederatedData", "LocalWork", "aligned_empty", "batch_indices",
           "datasets", "partition"]
