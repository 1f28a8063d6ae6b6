"""Models: the pure-function :class:`Model` interface, Flax adapters and reference models."""
from fedjax_sim.models import compression
from fedjax_sim.models.core import Model, from_flax, from_nnx, softmax_cross_entropy
from fedjax_sim.models.zoo import char_lstm, cnn, logistic_regression, make, mlp, mlp_2nn

__all__ = ["Model", "compression", "from_flax", "from_nnx", "softmax_cross_entropy", "char_lstm", "cnn", "logistic_regression",
           "make", "mlp", "mlp_2nn"]
