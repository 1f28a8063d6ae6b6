"""Learning-rate schedules across rounds (TFF's ``client_lr_schedule`` / ``server_lr_schedule``).

* Server: give the server optimizer an optax schedule, e.g. ``server_optimizer=optax.sgd(
  optax.cosine_decay_schedule(1.0, rounds))``. Optax indexes it by the optimizer's own step
  count, which advances once per applied server step: the round index (rounds whose aggregate
  was not applied, e.g. no client counted, do not count).
* Client: :func:`with_client_lr_schedule` wraps any algorithm so that round ``r``'s clients
  (0-based, counted as the server optimizer counts) scale their optimizer's updates by
  ``schedule(r)``, through the per-client ``lr_scale`` every client program already applies
  (exact for optimizers whose learning rate multiplies their output: SGD, momentum, Adam...).
  A client optimizer's own optax schedule indexes *local* steps instead (its state starts fresh
  every round).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp

from fedjax_sim.algorithms.base import Algorithm, ServerContext
from fedjax_sim.client import ClientProgram, with_context_view


class ScheduleState(NamedTuple):
  """The wrapped algorithm's server state: its own ``inner`` state and the ``round`` index
  (int32, server steps applied so far)."""
  inner: Any
  round: Any


def with_client_lr_schedule(algorithm: Algorithm,
                            schedule: Callable[[Any], Any]) -> Algorithm:
  """``algorithm`` whose client learning rate in round ``r`` (0-based) is multiplied by
  ``schedule(r)`` (any optax schedule, or a jnp function of an int32 scalar; e.g.
  ``optax.exponential_decay(1.0, transition_steps=10, decay_rate=0.5)`` halves it every 10
  rounds). It multiplies whatever ``lr_scale`` the client already has (``hparams
  client_lr_scale``, simulated heterogeneity). The round index lives in the server state, so
  checkpoints and resumes keep it."""
  if not callable(schedule):
    raise ValueError(f"schedule must be a function of the round index, got {schedule!r}")
  inner_factory, inner_init, inner_finish = (algorithm.client, algorithm.server_state_init,
                                             algorithm.server_finish)

  def client(model, optimizer) -> ClientProgram:
    inner = inner_factory(model, optimizer)

    def unwrap(ctx):
      scale = jnp.asarray(schedule(ctx.server.round), jnp.float32)
      return ctx._replace(server=ctx.server.inner, lr_scale=ctx.lr_scale * scale)

    return with_context_view(inner, unwrap)

  def server_state_init(params):
    return ScheduleState(inner_init(params), jnp.zeros((), jnp.int32))

  def server_finish(sctx: ServerContext, update):
    update, inner = inner_finish(sctx._replace(state=sctx.state.inner), update)
    # kept only when the step is applied (the engine reverts the server state otherwise)
    return update, ScheduleState(inner, sctx.state.round + 1)

  return dataclasses.replace(algorithm, client=client, server_state_init=server_state_init,
                             server_finish=server_finish)
