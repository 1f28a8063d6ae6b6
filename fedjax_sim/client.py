"""The client program: what ONE client does in a round, written as ``(init, step, final)``.

The engine owns the client axis: it vmaps a :class:`ClientProgram` over a chunk of clients and
drives its ``step`` over each client's local batches (a ``lax.fori_loop`` whose trip count is the
chunk's busiest client's steps; :func:`fedjax_sim.engine.make_cohort_fold`). Users and algorithm
authors write the program for one client, with a typed :class:`ClientContext` that says what a
client knows. A step whose batch is entirely masked (padding) is a no-op: the engine keeps the
carry of the previous step, whatever the program does.

Local SGD (:func:`local_training`) is the default program; algorithms with their own client
logic (SCAFFOLD's gradient mean, FedNova's normalisation probe, Ditto's personal model, ...)
bring their own, usually by wrapping the building blocks here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.models.core import Model

PyTree = Any
EmptyState = optax.EmptyState   # "no state": a pytree with no leaves


class Batch(NamedTuple):
  """One local batch of one client: ``x [B, ...]``, ``y [B]`` and ``mask [B]`` (False rows are
  padding and contribute nothing)."""
  x: jax.Array
  y: jax.Array
  mask: jax.Array


class ClientContext(NamedTuple):
  """What one client knows during a round (the engine vmaps it with the client).

  Attributes:
    client_id: int32 position of the client in the population.
    global_params: the model the client starts from (the global model; in asynchronous runs,
      the version the client downloaded).
    state: this client's persistent state (its row of ``ServerState.clients.algorithm``), or
      ``EmptyState()`` for algorithms without per-client state.
    server: the algorithm's server-side state broadcast to every client (e.g. SCAFFOLD's global
      control variate), or ``EmptyState()``.
    hparams: the run's in-state hyperparameters ``{name: float32 scalar}``
      (``ServerState.hparams``: the generic ones given to ``run`` and those the algorithm
      declares, e.g. FedProx's ``mu``).
    lr_scale: float32 scalar multiplying the client optimizer's updates (simulated
      heterogeneity times the ``client_lr_scale`` hyperparameter; 1 by default).
    key: this client's key for the round (``fold_in(round_key, client_id)``); the engine passes
      ``fold_in(key, t)`` to the t-th step.
    num_examples: int32 number of examples the client holds.
  """
  client_id: jax.Array
  global_params: PyTree
  state: Any = EmptyState()
  server: Any = EmptyState()
  hparams: Any = None
  lr_scale: Any = 1.0
  key: Any = None
  num_examples: Any = 0


class ClientResult(NamedTuple):
  """What one client sends back at the end of a round (the engine stacks these over clients).

  Attributes:
    delta: the update that is transformed and aggregated, conventionally
      ``global_params - local_params`` (a pseudo-gradient: the server descends along it).
    state: the client's new persistent state (kept only if its update counted), or
      ``EmptyState()``.
    upload: extra quantities averaged with the aggregation weights and handed to the
      algorithm's ``server_finish`` (``ServerContext.upload``), or ``EmptyState()``.
    metrics: scalars; the engine needs ``loss_sum``, ``correct``, ``count`` (summed over the
      examples seen in local training, before each step's update) and ``steps`` (non-empty
      local steps); programs may add their own (they appear in ``RoundOutput.clients``).
  """
  delta: PyTree
  state: Any = EmptyState()
  upload: Any = EmptyState()
  metrics: Any = None


class ClientProgram(NamedTuple):
  """ONE client's local work in a round.

  ``init(ctx) -> carry``; ``step(carry, batch: Batch, ctx, key) -> carry`` (one local step;
  ``key`` is fresh per step); ``final(carry, ctx) -> ClientResult``.
  """
  init: Callable[[ClientContext], Any]
  step: Callable[[Any, Batch, ClientContext, jax.Array], Any]
  final: Callable[[Any, ClientContext], ClientResult]


# (model, client_optimizer) -> ClientProgram: what an Algorithm holds (its `client` field).
ClientFactory = Callable[[Model, optax.GradientTransformation], ClientProgram]
# (params, ctx) -> scalar added to the local objective (FedProx's proximal term, ...).
Regularizer = Callable[[PyTree, ClientContext], jax.Array]


def zero_sums() -> dict[str, jax.Array]:
  """The running metric sums every program carries (see :class:`ClientResult`)."""
  zero = jnp.zeros((), jnp.float32)
  return {"loss_sum": zero, "correct": zero, "count": zero, "steps": jnp.zeros((), jnp.int32)}


def add_sums(sums: dict, loss_sum, correct, count) -> dict:
  """``sums`` plus one step's masked loss sum, correct predictions and example count."""
  return {"loss_sum": sums["loss_sum"] + loss_sum, "correct": sums["correct"] + correct,
          "count": sums["count"] + count, "steps": sums["steps"] + 1}


def scale_updates(updates: PyTree, lr_scale) -> PyTree:
  """Optimizer updates times the per-client learning-rate scale (exact for every optax
  optimizer whose learning rate multiplies its output: SGD, momentum, Adam, ...)."""
  return jax.tree.map(lambda u: (u * lr_scale).astype(u.dtype), updates)


def objective_grad(model: Model, regularizer: Regularizer | None = None):
  """``(params, batch, ctx, key=None) -> ((objective, (loss_sum, correct, count)), grads)``: the
  masked mean batch loss plus ``regularizer(params, ctx)``, and its gradient. ``key`` (the step's
  key) drives a stochastic model's training pass (Dropout); None is deterministic."""

  def objective(params, batch, ctx, key=None):
    loss, aux = model.batch_loss(params, batch.x, batch.y, batch.mask, key)
    if regularizer is not None:
      loss = loss + regularizer(params, ctx)
    return loss, aux

  return jax.value_and_grad(objective, has_aux=True)


class LocalCarry(NamedTuple):
  """The carry of :func:`local_training`: local params, client optimizer state, metric sums."""
  params: PyTree
  opt_state: Any
  sums: dict


def local_training(regularizer: Regularizer | None = None) -> ClientFactory:
  """The default client program: local training with the client optimizer (fresh state every
  round) on the masked mean batch loss plus ``regularizer(params, ctx)``; the delta is
  ``global_params - local_params``, no state, no upload. A stochastic model (Dropout) trains
  with each step's key."""

  def factory(model: Model, optimizer: optax.GradientTransformation) -> ClientProgram:
    grad_fn = objective_grad(model, regularizer)

    def init(ctx):
      return LocalCarry(ctx.global_params, optimizer.init(ctx.global_params), zero_sums())

    def step(carry, batch, ctx, key):
      (_, (loss_sum, correct, count)), grads = grad_fn(carry.params, batch, ctx, key)
      updates, opt_state = optimizer.update(grads, carry.opt_state, carry.params)
      params = optax.apply_updates(carry.params, scale_updates(updates, ctx.lr_scale))
      return LocalCarry(params, opt_state, add_sums(carry.sums, loss_sum, correct, count))

    def final(carry, ctx):
      delta = jax.tree.map(lambda g, l: g - l, ctx.global_params, carry.params)
      return ClientResult(delta, ctx.state, EmptyState(), dict(carry.sums))

    return ClientProgram(init, step, final)

  return factory


def run_program(program: ClientProgram, ctx: ClientContext, x, y, mask) -> ClientResult:
  """One client's program over its batches ``x [S, B, ...]``, ``y [S, B]``, ``mask [S, B]`` as a
  ``lax.scan`` (empty steps are no-ops; the t-th non-empty step gets ``fold_in(ctx.key, t)``). The
  engine's round is this, vmapped over clients with per-chunk trip counts."""
  key = ctx.key if ctx.key is not None else jax.random.key(0)

  def body(carry, inp):
    t, bx, by, bm = inp
    new = program.step(carry, Batch(bx, by, bm), ctx, jax.random.fold_in(key, t))
    return keep_if(jnp.any(bm), new, carry), None

  # the t-th NON-EMPTY step gets key t, as in the engine (which runs non-empty steps first)
  steps = (jnp.cumsum(jnp.any(mask, axis=1)) - 1).astype(jnp.int32)
  carry, _ = jax.lax.scan(body, program.init(ctx), (steps, x, y, mask))
  return program.final(carry, ctx)


def with_context_view(program: ClientProgram,
                      view: Callable[[ClientContext], ClientContext]) -> ClientProgram:
  """``program`` run with the context ``view(ctx)`` in its ``init``, ``step`` and ``final``: for
  a wrapper algorithm whose state nests the wrapped one's, so that the wrapped program still sees
  its own (e.g. DP-FedAvg's ``ctx._replace(server=ctx.server["base"])``; a client learning-rate
  schedule also scales ``lr_scale``)."""
  return ClientProgram(lambda ctx: program.init(view(ctx)),
                       lambda carry, batch, ctx, key: program.step(carry, batch, view(ctx), key),
                       lambda carry, ctx: program.final(carry, view(ctx)))


def keep_if(cond, new, old):
  """``new`` where ``cond`` (a scalar bool) else ``old``, leafwise: an empty step is a no-op."""
  return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def make_client_train(model: Model, client_optimizer: optax.GradientTransformation,
                      regularizer: Regularizer | None = None):
  """``train(global_params, x [S,B,...], y [S,B], mask [S,B], lr_scale=1.0) -> ClientResult``:
  :func:`local_training` run over one client's batches (a convenience for tests and notebooks)."""
  program = local_training(regularizer)(model, client_optimizer)

  def train(global_params, x, y, mask, lr_scale=1.0) -> ClientResult:
    ctx = ClientContext(jnp.int32(0), global_params, hparams={}, lr_scale=lr_scale,
                        key=jax.random.key(0))
    return run_program(program, ctx, x, y, mask)

  return train
