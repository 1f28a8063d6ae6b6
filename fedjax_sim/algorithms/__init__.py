"""Federated algorithms, one short module each, and a registry by name.

FedJAX's and the peers' families: FedAvg and server optimizers (FedAvgM, FedAdam, FedYogi,
FedAdagrad), client-drift corrections (FedProx, SCAFFOLD, FedNova, FedDyn, Mime, MimeLite),
personalization (Ditto, APFL, HypCluster), fairness (agnostic FedAvg) and asynchronous
aggregation (FedBuff).
"""
from fedjax_sim.algorithms.agnostic_fedavg import agnostic_fedavg
from fedjax_sim.algorithms.apfl import apfl
from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.ditto import ditto
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.feddyn import feddyn
from fedjax_sim.algorithms.fedopt import (adaptive_server_optimizer, fedadagrad, fedadam, fedavgm,
                                          fedyogi)
from fedjax_sim.algorithms.fedbuff import fedbuff   # asynchronous (fedjax_sim.run accepts it)
from fedjax_sim.algorithms.fednova import fednova
from fedjax_sim.algorithms.fedprox import fedprox, proximal_term
from fedjax_sim.algorithms.hypcluster import (hypcluster, hypcluster_callback,
                                              hypcluster_evaluate, hypcluster_init,
                                              hypcluster_model)
from fedjax_sim.algorithms.mime import mime
from fedjax_sim.algorithms.mimelite import mimelite
from fedjax_sim.algorithms.scaffold import scaffold
from fedjax_sim.algorithms.schedule import with_client_lr_schedule
from fedjax_sim.registry import Registry

# Every algorithm by name: the command line and config files reach what is registered here.
# Factories that take **fedavg_kwargs forward them to fedavg (their options include fedavg's).
REGISTRY = Registry("algorithm")
REGISTRY.register()(fedavg)
for _factory in (fedavgm, fedprox, fedadam, fedyogi, fedadagrad, scaffold, fednova, feddyn,
                 mime, mimelite, ditto, apfl, agnostic_fedavg, hypcluster):
  REGISTRY.register(forwards_to=fedavg)(_factory)
REGISTRY.register()(fedbuff)
make = REGISTRY.make   # make(name, **options): Algorithm by name, options checked

__all__ = ["Algorithm", "REGISTRY", "adaptive_server_optimizer", "agnostic_fedavg", "apfl",
           "ditto", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedbuff", "feddyn", "fednova",
           "fedprox", "fedyogi", "hypcluster", "hypcluster_callback", "hypcluster_evaluate", "hypcluster_init",
           "hypcluster_model", "make", "mime", "mimelite", "proximal_term", "scaffold",
           "with_client_lr_schedule"]
