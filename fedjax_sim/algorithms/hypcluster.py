"""HypCluster: hypothesis-based clustering, from Three Approaches for Personalization with
Applications to Federated Learning (Mansour, Mohri, Ro, Suresh, 2020), as FedJAX's
``hyp_cluster`` runs it.

The server keeps k models ``w^1..w^k`` (the global params are the k models stacked on a leading
axis: build the model with :func:`hypcluster_model`). Each round, every sampled client i picks the
model with the lowest loss on its own data, trains it, and the server averages per cluster::

    cluster             c_i = argmin_j  L_i(w^j)      (mean loss on the batches i's training sees)
    local training      w_i = local optimizer steps from w^{c_i} on client i's data
    per-cluster update  Delta^j = sum_{i in S, c_i = j} p_i (w^j - w_i) / sum_{i in S, c_i = j} p_i
                        (0 for a cluster no client chose)
    models              w^j <- server_optimizer step on Delta^j  (sgd(1): w^j - Delta^j)

``p_i`` is the aggregation weight (example count by default). A client's personalised model is
the one it picks: :func:`hypcluster_evaluate` picks each client's cluster on its training data
and reports its accuracy on its test data (percentiles as in
:func:`fedjax_sim.evaluation.evaluate_clients`). ``RoundOutput.clients["cluster"]`` holds each
sampled client's choice per round.

How it is computed: the client program trains all k models on the same batches (a vmap over
the cluster axis: k times the local compute of FedAvg) while summing each global model's loss on
those batches; ``final`` picks ``c_i`` and returns the delta stacked ``[k, ...]`` with zeros
outside row ``c_i``, and uploads ``onehot(c_i)``. The aggregate's row j is then
``sum_{c_i = j} p_i delta_i / sum_i p_i``; ``server_finish`` divides it by the uploaded mean of
``onehot(c_i)_j``. Training every model gives exactly the model the client would get training
only ``w^{c_i}``, with the choice made on all of its data (an online choice on the first batch
would be cheaper but is not FedJAX's rule).

Deviations, stated:
- One server optimizer over the stacked models: with ``sgd`` (any learning rate) it is FedJAX's
  per-cluster step exactly; with a stateful one (momentum, Adam) a cluster that no client chose
  gets a zero update but its optimizer state still advances (FedJAX skips that cluster's step).
- The initial models are k independent ``model.init`` draws (FedJAX's default) unless the run
  gets ``init_params=hypcluster_init(...)``: FedJAX's optional k-means++-like initialisation
  (train a set of clients from one init; the first center is a random one of their models, each
  next one the model of the client whose best loss under the centers so far is the largest).
- With a non-stacked model (a plain :class:`~fedjax_sim.models.Model`) and ``num_clusters=1``
  it is FedAvg (its ``RoundOutput.clients["cluster"]`` is then all zeros).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim import evaluation
from fedjax_sim.algorithms.base import Algorithm, ServerContext
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.client import ClientProgram, ClientResult, local_training, make_client_train
from fedjax_sim.data.federated import FederatedData, LocalWork, batch_indices
from fedjax_sim.models.core import Model
from fedjax_sim.personalize import summarize


@dataclasses.dataclass(frozen=True, eq=False)
class HypClusterModel(Model):
  """``num_clusters`` copies of ``base`` as one :class:`Model` whose params are the copies
  stacked on a leading axis ``[k, ...]`` (:func:`hypcluster_model`)."""
  base: Model | None = None
  num_clusters: int = 1


def _check_k(k, where: str) -> int:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f"{where}: the number of clusters must be an integer >= 1, got {k!r}")
  return int(k)


def hypcluster_model(model: Model, num_clusters: int) -> HypClusterModel:
  """The k-model wrapper HypCluster trains: ``init(key)`` stacks k independent inits of
  ``model`` (keys ``split(key, k)``); ``apply(params [k, ...], x [B, ...])`` returns the
  log of the k models' mean softmax, a label-free ensemble used when the run evaluates "the
  global model" on a pooled test set. The meaningful HypCluster metric is each client with its
  own cluster's model: :func:`hypcluster_evaluate`."""
  if isinstance(model, HypClusterModel):
    raise ValueError("hypcluster_model: the model is already a HypCluster model")
  k = _check_k(num_clusters, "hypcluster_model")

  def init(key):
    return jax.vmap(model.init)(jax.random.split(key, k))

  def apply(params, x):
    logits = jax.vmap(lambda p: model.apply(p, x))(params)          # [k, B, C]
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, -1), axis=0) - jnp.log(k)

  return HypClusterModel(init, apply, model.input_shape, model.num_classes, model.loss,
                         f"hypcluster{k}_{model.name}", base=model, num_clusters=k)


class ClusterCarry(NamedTuple):
  local: Any            # local training carries of the k models, stacked [k]
  loss_sum: jax.Array   # [k] loss of each global model summed over the examples seen


def _select_row(tree, c):
  return jax.tree.map(lambda a: a[c], tree)


def hypcluster_client(num_clusters: int | None):
  """The HypCluster client program (module docstring)."""

  def factory(model, optimizer) -> ClientProgram:
    base, k = unwrap(model, num_clusters)
    if base is None:   # a plain model, one cluster: FedAvg's program, cluster 0
      inner = local_training()(model, optimizer)

      def final1(carry, ctx):
        res = inner.final(carry, ctx)
        return res._replace(metrics=dict(res.metrics, cluster=jnp.zeros((), jnp.int32)))

      return ClientProgram(inner.init, inner.step, final1)
    inner = local_training()(base, optimizer)

    def per_cluster(fn, ctx, *args):
      return jax.vmap(lambda p, *a: fn(*a, ctx._replace(global_params=p)))(ctx.global_params,
                                                                            *args)

    def init(ctx):
      return ClusterCarry(per_cluster(lambda c: inner.init(c), ctx),
                          jnp.zeros(k, jnp.float32))

    def step(carry, batch, ctx, key):
      local = per_cluster(lambda c, cx: inner.step(c, batch, cx, key), ctx, carry.local)
      loss = jax.vmap(lambda p: base.batch_loss(p, batch.x, batch.y, batch.mask)[1][0])(
          ctx.global_params)
      return ClusterCarry(local, carry.loss_sum + loss.astype(jnp.float32))

    def final(carry, ctx):
      res = per_cluster(lambda c, cx: inner.final(c, cx), ctx, carry.local)
      c = jnp.argmin(carry.loss_sum).astype(jnp.int32)
      onehot = jax.nn.one_hot(c, k, dtype=jnp.float32)
      # rows of the clusters not chosen are zeros (where, not a product: they may be non-finite)
      delta = jax.tree.map(
          lambda d: jnp.where(jnp.reshape(onehot > 0, (k,) + (1,) * (d.ndim - 1)), d, 0),
          res.delta)
      metrics = dict(_select_row(res.metrics, c), cluster=c)
      return ClientResult(delta, ctx.state, onehot, metrics)

    return ClientProgram(init, step, final)

  return factory


def unwrap(model: Model, num_clusters: int | None = None) -> tuple[Model | None, int]:
  """``(base model, k)`` of a :func:`hypcluster_model`, or ``(None, 1)`` for a plain model
  (only with ``num_clusters`` 1 or None); ValueError when they disagree."""
  if isinstance(model, HypClusterModel):
    if num_clusters is not None and num_clusters != model.num_clusters:
      raise ValueError(f"hypcluster: num_clusters={num_clusters} but the model has "
                       f"{model.num_clusters} clusters")
    return model.base, model.num_clusters
  if num_clusters not in (None, 1):
    raise ValueError(f"hypcluster with num_clusters={num_clusters} trains "
                     f"fs.algorithms.hypcluster_model(model, {num_clusters}), got the plain model "
                     f"{getattr(model, 'name', model)!r}")
  return None, 1


def _per_cluster_mean(ctx: ServerContext, update):
  if not jax.tree.leaves(ctx.upload):   # a plain model: FedAvg
    return update, ctx.state
  share = ctx.upload                    # [k]: sum_{c_i = j} p_i / sum_i p_i

  def divide(u):
    s = jnp.reshape(share, (-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)
    return jnp.where(s > 0, u / jnp.maximum(s, 1e-30), 0)

  return jax.tree.map(divide, update), ctx.state


def hypcluster(client_optimizer: optax.GradientTransformation | None = None,
               server_optimizer: optax.GradientTransformation | None = None, *,
               num_clusters: int | None = None, **fedavg_kwargs) -> Algorithm:
  """HypCluster (module docstring). Train it with ``hypcluster_model(model, k)``;
  ``num_clusters`` (optional) is checked against the model's k. Other arguments as
  :func:`fedjax_sim.algorithms.fedavg`."""
  if num_clusters is not None:
    num_clusters = _check_k(num_clusters, "hypcluster")
  base = fedavg(client_optimizer, server_optimizer, **fedavg_kwargs)
  return dataclasses.replace(base, name="hypcluster", client=hypcluster_client(num_clusters),
                             server_finish=_per_cluster_mean)


def hypcluster_evaluate(model: HypClusterModel, params, train: FederatedData,
                        test: FederatedData, *, batch_size: int = 256, chunk_size: int = 32,
                        worst: int = 5) -> dict[str, Any]:
  """Personalised evaluation: every client picks the cluster whose model has the lowest mean
  loss on its ``train`` data (FedJAX's rule; a client without training examples picks 0) and
  is evaluated with that model on its ``test`` data (the same clients in the same order).

  Returns per-client ``cluster``, ``accuracy``, ``loss``, ``count`` (``[P]``), ``client_ids`` and
  a ``summary`` (:func:`fedjax_sim.personalize.summarize`: weighted and mean accuracy,
  10/50/90th percentiles, worst clients).
  """
  if not isinstance(model, HypClusterModel):
    raise ValueError("hypcluster_evaluate: model must come from hypcluster_model(model, k)")
  if train.num_clients != test.num_clients or not np.array_equal(train.client_ids,
                                                                 test.client_ids):
    raise ValueError(f"hypcluster_evaluate: train and test must hold the same clients in the "
                     f"same order ({train.num_clients} vs {test.num_clients} clients)")
  base, k = model.base, model.num_clusters
  lead = {int(np.shape(a)[0]) for a in jax.tree.leaves(params)}
  if lead != {k}:
    raise ValueError(f"hypcluster_evaluate: params must be {k} models stacked on axis 0, got "
                     f"leading sizes {sorted(lead)}")

  def per_cluster(data):
    base.check_input(data.arrays["x"].shape[1:], "hypcluster_evaluate data")
    f = evaluation.make_client_evaluate(base, data.max_client_size, batch_size, chunk_size)
    arrays = (jnp.asarray(data.arrays["x"]), jnp.asarray(data.arrays["y"], jnp.int32),
              jnp.asarray(data.offsets[:-1], jnp.int32), jnp.asarray(data.sizes, jnp.int32))
    outs = [jax.device_get(f(_select_row(params, j), *arrays)) for j in range(k)]
    return {name: np.stack([np.asarray(o[name], np.float64) for o in outs])
            for name in ("loss", "accuracy", "count")}

  tr, te = per_cluster(train), per_cluster(test)
  cluster = np.argmin(tr["loss"], axis=0)
  rows = np.arange(train.num_clients)
  acc, loss, cnt = te["accuracy"][cluster, rows], te["loss"][cluster, rows], te["count"][0]
  return {"cluster": cluster, "accuracy": acc, "loss": loss, "count": cnt,
          "client_ids": test.client_ids,
          "summary": summarize(acc, cnt, test.client_ids, worst)}


def hypcluster_callback(model: HypClusterModel, train: FederatedData, test: FederatedData,
                        every: int = 10, *, rounds: int | None = None, batch_size: int = 256,
                        chunk_size: int = 32):
  """A ``fs.run(callback=...)`` that puts HypCluster's personalized accuracy in the history:
  every ``every`` rounds (and at round ``rounds``, the last, if given) each client picks its
  cluster on ``train`` and is scored on ``test`` (:func:`hypcluster_evaluate`); the record gets
  ``personal_accuracy_weighted``, ``_mean``, ``_p10``, ``_p50``, ``_p90`` (the same columns as
  :func:`fedjax_sim.personalize.personal_eval_callback`, so
  ``History.client_percentiles(prefix="personal_")`` plots them) and ``num_clusters_used``."""
  if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every <= 0:
    raise ValueError(f"every must be a positive integer, got {every!r}")
  if not isinstance(model, HypClusterModel):
    raise ValueError("hypcluster_callback: model must come from hypcluster_model(model, k)")

  def callback(r, state, out):
    del out
    if r % every and r != rounds:
      return None
    ev = hypcluster_evaluate(model, state.params, train, test, batch_size=batch_size,
                             chunk_size=chunk_size)
    rec = {"personal_" + k: v for k, v in ev["summary"].items() if isinstance(v, float)}
    rec["num_clusters_used"] = float(len(np.unique(ev["cluster"])))
    return rec

  return callback


def hypcluster_init(model: HypClusterModel, data: FederatedData, client_ids, *,
                    client_optimizer: optax.GradientTransformation | None = None,
                    local_epochs: int = 1, batch_size: int = 32, seed: int = 0):
  """k-means++-like initial models for HypCluster (FedJAX's ``init_cluster_client_ids``).

  Every client of ``client_ids`` (``[n]`` population positions) trains ``local_epochs`` of the
  ``client_optimizer`` (default ``optax.sgd(0.05)``) from one ``base.init`` draw; the first
  center is the model of a client drawn at random, each next one the model of the client whose
  lowest mean training loss under the centers so far is the largest. Returns the k models
  stacked ``[k, ...]``, for ``fs.run(..., init_params=...)``. ``seed`` drives the init, the
  shuffles and the first draw.
  """
  if not isinstance(model, HypClusterModel):
    raise ValueError("hypcluster_init: model must come from hypcluster_model(model, k)")
  ids = np.asarray(client_ids)
  if (ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer)
      or ids.min() < 0 or ids.max() >= data.num_clients):
    raise ValueError(f"hypcluster_init: client_ids must be a non-empty 1-D array of ints in "
                     f"[0, {data.num_clients}), got {client_ids!r}")
  base, k = model.base, model.num_clusters
  base.check_input(data.arrays["x"].shape[1:], "hypcluster_init data")
  key_init, key_batch, key_first = jax.random.split(jax.random.key(seed), 3)
  start = base.init(key_init)
  rows, mask = batch_indices(key_batch, jnp.asarray(ids, jnp.int32),
                             jnp.asarray(data.offsets[ids], jnp.int32),
                             jnp.asarray(data.sizes[ids], jnp.int32),
                             LocalWork(batch_size, local_epochs), data.max_client_size)
  rows = np.clip(np.asarray(rows), 0, data.num_examples - 1)
  x, y = jnp.asarray(data.arrays["x"][rows]), jnp.asarray(data.arrays["y"][rows], jnp.int32)
  train = make_client_train(base, client_optimizer or optax.sgd(0.05))
  deltas = jax.jit(jax.vmap(lambda a, b, m: train(start, a, b, m).delta))(x, y, mask)
  trained = jax.tree.map(lambda p, d: p[None] - d, start, deltas)              # [n, ...]
  evaluate = evaluation.make_client_evaluate(base, data.max_client_size)
  arrays = (jnp.asarray(data.arrays["x"]), jnp.asarray(data.arrays["y"], jnp.int32),
            jnp.asarray(data.offsets[:-1], jnp.int32), jnp.asarray(data.sizes, jnp.int32))

  def losses(a):   # mean loss of client a's model on every client of ids
    return np.asarray(evaluate(_select_row(trained, a), *arrays)["loss"], np.float64)[ids]

  centers = [int(jax.random.randint(key_first, (), 0, ids.size))]
  best = losses(centers[0])
  for _ in range(1, k):
    centers.append(int(np.argmax(best)))
    best = np.minimum(best, losses(centers[-1]))
  return jax.tree.map(lambda t: t[np.asarray(centers)], trained)
