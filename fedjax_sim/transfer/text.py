"""Sentence-embedding features of texts for caching (length-bucketed batches)."""

from __future__ import annotations

import functools

import jax
import numpy as np


def text_features(encoder, texts, max_tokens: int = 64, batch_size: int = 64,
                  buckets: tuple[int, ...] = (16, 32, 64), upto: int | None = None) -> np.ndarray:
  """Sentence embeddings ``[N, hidden]`` of ``texts`` with a
  :class:`~fedjax_sim.transfer.minilm.MiniLMEncoder` (pretrained, or with randomly initialised
  params), for caching.

  With ``upto=j``: instead, the token states after the encoder's first ``j`` blocks, packed with
  the attention mask as one more channel and padded to ``T = min(max_tokens, longest text)``
  tokens: ``[N, T, hidden + 1]``, the input of :func:`fedjax_sim.transfer.minilm.split_tail`
  (the frozen prefix of a partially unfrozen encoder, computed once).

  Texts are truncated to ``max_tokens`` tokens, sorted by length and run in batches of
  ``batch_size`` padded to the smallest bucket length that fits (so the compiled encoder is
  built at most ``len(buckets)`` times and short texts do not pay for long ones). Results are in
  the original order; padding never changes an embedding (masked mean pooling).
  """
  texts = list(texts)
  hidden, layers = encoder.module.cfg.hidden, encoder.module.cfg.layers
  if upto is not None and (isinstance(upto, bool) or not isinstance(upto, int)
                           or not 0 <= upto <= layers):
    raise ValueError(f"upto must be an integer in [0, {layers}] (the encoder's blocks), "
                     f"got {upto!r}")
  if not texts:
    return np.zeros((0, hidden) if upto is None else (0, 1, hidden + 1), np.float32)
  ids, mask = encoder.tokenize(texts, truncate=True)
  if ids.shape[1] > max_tokens:   # keep [SEP] last, as tokenize does
    lengths = mask.sum(1)
    cut = lengths > max_tokens
    last = ids[np.arange(len(ids)), lengths - 1]
    ids, mask = ids[:, :max_tokens].copy(), mask[:, :max_tokens].copy()
    ids[cut, max_tokens - 1] = last[cut]
  lengths = mask.sum(1)
  bks = sorted(set(min(b, ids.shape[1]) for b in buckets) | {ids.shape[1]})
  order = np.argsort(lengths, kind="stable")
  apply = jax.jit(functools.partial(encoder.module.apply, upto=upto))
  width = ids.shape[1]
  out = np.zeros((len(texts), hidden) if upto is None else (len(texts), width, hidden + 1),
                 np.float32)
  for s in range(0, len(texts), batch_size):
    rows = order[s:s + batch_size]
    t = next(b for b in bks if b >= lengths[rows].max())
    bi = np.zeros((batch_size, t), np.int32)
    bm = np.zeros((batch_size, t), bool)
    bm[:, 0] = True   # padding rows: one token, discarded below
    bi[:len(rows)], bm[:len(rows)] = ids[rows, :t], mask[rows, :t]
    got = np.asarray(apply({"params": encoder.params}, bi, bm))[:len(rows)]
    if upto is None:
      out[rows] = got
    else:   # token states of the real tokens; padding tokens stay 0 with mask channel 0
      out[rows, :t, :hidden] = got * bm[:len(rows), :, None]
      out[rows, :t, hidden] = bm[:len(rows)]
  return out
