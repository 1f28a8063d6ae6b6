"""fedjax_sim: a vectorized federated-learning simulator on JAX.

Every client is one slice of a leading batch axis: a whole cohort's local training is one
``vmap``-ed, ``jit``-compiled ``lax.scan``; aggregation is a weighted reduction over that axis;
the server applies an optax optimizer to the aggregated update.

>>> import optax, fedjax_sim as fs
>>> train, test = fs.datasets.digits()
>>> data = fs.FederatedData.from_partition(train, fs.partition.dirichlet(train["y"], 20, 0.5), num_classes=10)
>>> algo = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=16)
>>> result = fs.run(algo, fs.models.logistic_regression(64, 10), data, rounds=3, cohort_size=5,
...                 eval_data=test, progress=False)
>>> {'round', 'train_loss', 'test_accuracy'} <= set(result.history)
True
"""

from fedjax_sim import (aggregators, algorithms, asynchronous, augment, callbacks, checkpoint,
                        client, distributed, engine, evaluation, experiment, heterogeneity, models,
                        optimizers, personalize, privacy, registry, remedies, server, sweep,
                        testing, transfer, transforms, tree, validation)
from fedjax_sim.asynchronous import run_async
from fedjax_sim.data import ClientBatches, FederatedData, LocalWork, adapters, datasets, partition
from fedjax_sim.heterogeneity import Heterogeneity
from fedjax_sim.history import (History, add_client_summaries, plot_histories,
                                plot_label_distribution)
from fedjax_sim.loop import RunResult, run

__version__ = "0.1.0"

__all__ = ["ClientBatches", "FederatedData", "Heterogeneity", "History", "LocalWork", "RunResult",
           "adapters", "add_client_summaries", "aggregators", "algorithms", "asynchronous",
           "augment", "callbacks", "checkpoint", "client", "distributed", "datasets", "engine",
           "evaluation", "experiment",
           "heterogeneity", "models", "optimizers", "partition", "personalize", "plot_histories",
           "plot_label_distribution",
           "privacy", "registry", "remedies", "run", "run_async", "server",
           "sweep", "testing",
           "transfer", "transforms", "tree", "validation"]
