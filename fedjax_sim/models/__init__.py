"""Models: the pure-function :class:`Model` interface, Flax adapters and reference models; what a
model costs (:mod:`~fedjax_sim.models.cost`), magnitude pruning
(:mod:`~fedjax_sim.models.pruning`) and bfloat16 compute (:mod:`~fedjax_sim.models.precision`)."""
from fedjax_sim.models import cost, precision, pruning
from fedjax_sim.models.core import (Model, from_flax, from_nnx, huber, label_dtype, mae, mse,
                                   softmax_cross_entropy)
from fedjax_sim.models.zoo import (char_lstm, cnn, logistic_regression, make, mlp, mlp_2nn,
                                   regression_mlp)

__all__ = ["Model", "cost", "from_flax", "from_nnx", "precision", "pruning", "huber",
           "label_dtype", "mae", "mse", "softmax_cross_entropy", "char_lstm", "cnn",
           "logistic_regression", "make", "mlp", "mlp_2nn", "regression_mlp"]
