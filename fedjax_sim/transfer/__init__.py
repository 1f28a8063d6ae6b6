"""Transfer learning: a pretrained encoder, frozen or partly unfrozen, plus a federated head.

One module per concern:

* :mod:`~fedjax_sim.transfer.encoders`: frozen encoder + trainable head models, features cached
  once (:func:`feature_cache`), encoders cut from a trained Flax classifier.
* :mod:`~fedjax_sim.transfer.unfreeze`: chosen encoder leaves become federated params
  (:func:`partially_frozen_model`).
* :mod:`~fedjax_sim.transfer.pretraining`: centralized pretraining on a source task, encoder
  checkpoints.
* :mod:`~fedjax_sim.transfer.joint`: the joint objective ``a * f_source + b * g_target
  + c * align``; :mod:`~fedjax_sim.transfer.alignment`: its domain-alignment terms (CORAL, MMD,
  moment matching) and the closed-form affine map between domains from aggregated moments.
* :mod:`~fedjax_sim.transfer.transferability`: federated estimates of which source encoder to
  pick (LogME, LEEP, H-score).
* :mod:`~fedjax_sim.transfer.semi_supervised`: confident pseudo-labels of the clients' unlabeled
  examples, added to their labelled ones (self-training).
* :mod:`~fedjax_sim.transfer.minilm`: the all-MiniLM-L6-v2 sentence encoder in Flax;
  :mod:`~fedjax_sim.transfer.text`: its sentence embeddings of many texts, for caching.

What the federated params cost on the wire (:func:`communication`) is
:mod:`fedjax_sim.models.cost`, exported here too.
"""
from fedjax_sim.models.cost import communication, num_bytes, num_params
from fedjax_sim.transfer import (alignment, encoders, joint, minilm, pretraining,
                                 semi_supervised, text, transferability, unfreeze)
from fedjax_sim.transfer.encoders import (EncoderApply, encode, feature_cache, feature_shape,
                                          flax_encoder, frozen_encoder_model, head_model)
from fedjax_sim.transfer.joint import JointModel, joint_objective_model
from fedjax_sim.transfer.pretraining import (PretrainResult, load_encoder, pretrain,
                                             save_encoder)
from fedjax_sim.transfer.text import text_features
from fedjax_sim.transfer.unfreeze import (merge_encoder, param_paths, partially_frozen_model,
                                          split_encoder)

__all__ = ["EncoderApply", "JointModel", "PretrainResult", "alignment", "communication", "encode",
           "encoders", "feature_cache", "feature_shape", "flax_encoder", "frozen_encoder_model",
           "head_model", "joint", "joint_objective_model", "load_encoder", "merge_encoder",
           "minilm", "num_bytes", "num_params", "param_paths", "partially_frozen_model",
           "pretrain", "pretraining", "save_encoder", "semi_supervised", "split_encoder", "text",
           "text_features", "transferability", "unfreeze"]
