"""MimeLite (Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich, Suresh 2020, "Mime: Mimicking
Centralized Stochastic Algorithms in Federated Learning", Algorithm 1) with SGD with momentum as
the base optimizer.

Mime without the control variate: clients step along the base optimizer's direction with the
server's momentum ``m`` held fixed, on their plain stochastic gradients. Round t, global model x::

    client i:  y <- x;  for each local batch zeta:  y <- y - eta ((1 - beta) grad f_i(y; zeta)
                                                                 + beta m)
               upload grad f_i(x) (the client's full-batch gradient at x)
    server:    x <- x - server_step(mean_i (x - y_i))               (sgd(1): x <- mean_i y_i)
               m <- (1 - beta) mean_i grad f_i(x) + beta m

This is the paper's MimeLite exactly (no staleness: ``grad f_i(x)`` is needed only after local
training, as in FedJAX's ``mime_lite``). The program computes ``grad f_i(x)`` on the batches it
trains on (one extra gradient per step, no extra pass over the data): the mean over the examples
it visits, the full-batch gradient when the local work is whole epochs (FedJAX makes a separate
full pass). See :mod:`fedjax_sim.algorithms.mime` for the client optimizer, ``beta``, the
weighting and FedJAX's momentum convention. The server state
(:class:`~fedjax_sim.algorithms.mime.MimeState`) also keeps the last ``mean_i grad f_i(x)``,
which MimeLite does not read.
"""

from __future__ import annotations

import dataclasses

import optax

from fedjax_sim.algorithms.base import Algorithm
from fedjax_sim.algorithms.fedavg import fedavg
from fedjax_sim.algorithms.mime import check_beta, mime_program, mime_state_init, update_momentum


def mimelite(client_optimizer: optax.GradientTransformation | None = None,
             server_optimizer: optax.GradientTransformation | None = None, *, beta: float = 0.9,
             **fedavg_kwargs) -> Algorithm:
  """MimeLite with SGD-with-momentum ``beta`` in [0, 1) as the base optimizer (module
  docstring); other arguments as :func:`fedjax_sim.algorithms.mime.mime`."""
  beta = check_beta("MimeLite", beta)
  base = fedavg(client_optimizer, server_optimizer, **fedavg_kwargs)
  return dataclasses.replace(base, name="mimelite", client=mime_program(corrected=False),
                             server_state_init=mime_state_init, server_finish=update_momentum,
                             hparams={"beta": beta})
