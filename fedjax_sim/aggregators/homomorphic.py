"""Homomorphic aggregation with CKKS (TenSEAL): the server adds ciphertexts only.

CKKS (Cheon, Kim, Kim, Song, "Homomorphic Encryption for Arithmetic of Approximate Numbers",
ASIACRYPT 2017) encrypts a vector of reals packed into the ``N/2`` slots of one ciphertext
(``N`` the polynomial modulus degree); ciphertexts under one public key add slot-wise, and the
holder of the secret key decrypts the sum up to a small approximation error. The library is
TenSEAL (Microsoft SEAL underneath), an optional extra: ``pip install 'fedjax_sim[he]'``.

The protocol, as run by :func:`ckks_mean` every round::

  setup      the key holder makes one CKKS context per run (KeyHolder): the secret key stays
             with it; clients and server get the public context (encryption and addition only)
  client c   u_c = (w_c / W) * clip(delta_c)   W = sum of the cohort's weights (public)
             uploads Enc_pk(u_c): ceil(n / (N/2)) ciphertexts (the update packed slot-wise)
  server     adds the ciphertexts of the clients that uploaded (drop-outs send nothing)
  key holder decrypts the sum:  sum_c u_c = the weighted mean, up to CKKS error

**Threat model.** An honest-but-curious server: it follows the protocol but looks at everything
it receives. It holds only the public context, so it sees each client's *ciphertexts* (sizes
included), the public weights and which clients uploaded, and, once the key holder returns it, the
decrypted *aggregate* (which it needs to update the model). The secret key is held by a key
holder that is not the server (a trusted third party, or in deployments a threshold key shared by
the clients; threshold decryption is not simulated here). The aggregate itself is protected only
by differential privacy if the clients add noise before encrypting (an update transform such as
:func:`fedjax_sim.privacy.local_gaussian_noise`). Not covered: a server colluding with the key
holder (it can decrypt any upload), malicious clients (no proof that an upload is well formed:
clip on the client), traffic analysis.

**What is simulated.** The cryptography is real: encryption, ciphertext addition and decryption
run TenSEAL on the host, every round, with real keys and serialized ciphertexts (sizes are the
bytes that would be sent). They run in a host callback (``jax.experimental.io_callback``) inside
the compiled round, after the cohort's fold: the jitted training is the same program as with the
plain mean; only ``finalize`` crosses to the host. Clients are encrypted one after another on the
host (a real deployment encrypts in parallel on the devices: per-client time is
``encrypt_seconds / num_clients``); the ``ceil(n / (N/2))`` ciphertexts of one client form one
batched TenSEAL ``CKKSTensor``, encrypted, added and (de)serialized on TenSEAL's C++ thread pool
(``threads``; TenSEAL's Python bindings hold the GIL, so a Python thread pool over the clients
would run them one at a time anyway).

**Precision.** Values are encoded at scale ``2**scale_bits``; a fresh encryption and a sum of C
of them decrypt with absolute error around ``1e-8 * sqrt(C)`` per coordinate at the default
parameters (N = 8192, coefficient moduli 60-40-40-60 bits, scale 2^40; measured on 4096 values:
7e-9 for C = 1, 3e-8 for C = 10, 9e-8 for C = 100): well within the absolute 1e-6 the tests
demand. Every encrypted coordinate must stay below ``2**(first modulus bits - scale_bits)`` =
2^20 in magnitude: the weighted updates ``(w_c / W) delta_c`` are far
below that unless an update explodes, which raises ``ValueError`` (clip the updates).

**Costs** (see :class:`RoundCost`, recorded every round on the aggregator's :class:`Session`,
:func:`session_of`; :func:`cost_callback` puts them into the run's history): a ciphertext of N = 8192 packs 4096
values in ~330 KB (~80 bytes per value against 4 for float32: ~20x the plain upload).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from fedjax_sim.aggregators.base import Aggregator
from fedjax_sim.aggregators.robust import buffered
from fedjax_sim.transforms.compression import unflatten

PyTree = Any

_DEGREES = (4096, 8192, 16384, 32768)


def tenseal():
  """The ``tenseal`` module, or ``ImportError`` saying how to install it."""
  try:
    import tenseal as ts   # noqa: PLC0415 - optional extra
  except ImportError as e:
    raise ImportError("homomorphic aggregation needs TenSEAL: pip install 'fedjax_sim[he]' "
                      "(or pip install tenseal)") from e
  return ts


class CKKSParams(NamedTuple):
  """CKKS parameters: ``poly_modulus_degree`` N (``N/2`` values per ciphertext), the bit sizes
  of the coefficient modulus primes (first and last: the precision of the integer part and of
  decryption; the middle ones: one per multiplication level, unused by a sum), and the encoding
  scale ``2**scale_bits``."""
  poly_modulus_degree: int = 8192
  coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
  scale_bits: int = 40

  @property
  def slots(self) -> int:
    return self.poly_modulus_degree // 2

  @property
  def max_value(self) -> float:
    """Magnitude an encrypted coordinate must stay below: ``2**(first - scale_bits)``."""
    return 2.0 ** (self.coeff_mod_bit_sizes[0] - self.scale_bits)


def check_params(params: CKKSParams):
  """``ValueError`` unless the parameters make a CKKS context that can hold a sum."""
  n, bits, scale = params
  if n not in _DEGREES:
    raise ValueError(f"CKKS poly_modulus_degree must be one of {_DEGREES}, got {n!r}")
  bits = tuple(bits)
  if len(bits) < 2 or not all(isinstance(b, (int, np.integer)) and 20 <= b <= 60 for b in bits):
    raise ValueError("CKKS coeff_mod_bit_sizes must be at least two integers in 20..60, got "
                     f"{bits!r}")
  # SEAL's 128-bit security bound on the total modulus size for each degree.
  limit = {4096: 109, 8192: 218, 16384: 438, 32768: 881}[n]
  if sum(bits) > limit:
    raise ValueError(f"CKKS coeff_mod_bit_sizes {bits} sum to {sum(bits)} bits, over the "
                     f"128-bit-security limit {limit} for poly_modulus_degree {n}")
  if not isinstance(scale, (int, np.integer)) or not 10 <= scale < bits[0]:
    raise ValueError(f"CKKS scale_bits must be an integer in 10..{bits[0] - 1} (below the first "
                     f"modulus, {bits[0]} bits), got {scale!r}")


class Ciphertext(NamedTuple):
  """An encrypted vector as sent on the wire: ``chunks`` are serialized batched CKKS tensors
  (TenSEAL ``CKKSTensor``, one per chunk; :meth:`PublicKey.encrypt` makes one) holding
  ``num_ciphertexts`` CKKS ciphertexts of ``slots`` values each (the last one partly filled),
  ``length`` the vector's length and ``fingerprint`` the id of the public key it is encrypted
  under."""
  chunks: tuple[bytes, ...]
  length: int
  fingerprint: bytes
  num_ciphertexts: int = 0

  @property
  def nbytes(self) -> int:
    return sum(len(c) for c in self.chunks)


def _packed(v: np.ndarray, slots: int) -> tuple[list[float], list[int]]:
  """``v [n]`` zero-padded to ``k = ceil(n / slots)`` rows of ``slots`` and laid out as a
  ``[slots, k]`` tensor (row-major list, shape) whose column j is ciphertext j's slots; shape
  ``[slots]`` when ``k = 1`` (TenSEAL 0.3 mis-decrypts a batched ``[slots, 1]`` tensor)."""
  k = max(-(-v.size // slots), 1)
  padded = np.zeros(k * slots, np.float64)
  padded[:v.size] = v
  return padded.reshape(k, slots).T.ravel().tolist(), ([slots, k] if k > 1 else [slots])


def _threads(threads):
  """TenSEAL's ``n_threads`` keyword: ``{}`` (its default, the hardware concurrency) or the
  given count."""
  return {} if threads is None else {"n_threads": int(threads)}


class PublicKey:
  """What clients and the server hold: the public CKKS context. Encrypts and adds; cannot
  decrypt. ``threads``: TenSEAL's C++ thread pool size for one vector's ciphertexts (default:
  the hardware concurrency)."""

  def __init__(self, params: CKKSParams, public_bytes: bytes, fingerprint: bytes,
               threads: int | None = None):
    self.params, self.fingerprint = params, fingerprint
    self.context = tenseal().context_from(public_bytes, **_threads(threads))

  def encrypt(self, vector: np.ndarray) -> Ciphertext:
    """``vector [n]`` (float) -> its ciphertext, packed ``N/2`` values per CKKS ciphertext."""
    ts = tenseal()
    v = np.asarray(vector, np.float64).ravel()
    big = np.max(np.abs(v), initial=0.0)
    if not big < self.params.max_value:   # NaN too
      raise ValueError(f"CKKS encryption: a coordinate of magnitude {big:.3g} is not below "
                       f"2**(coeff_mod_bit_sizes[0] - scale_bits) = {self.params.max_value:.3g}; "
                       "it would decrypt wrongly (clip the updates)")
    # One batched CKKSTensor: TenSEAL encrypts its ciphertexts on its C++ thread pool (its
    # Python bindings hold the GIL, so a Python thread pool over clients would not help).
    data, shape = _packed(v, self.params.slots)
    tensor = ts.ckks_tensor(self.context, ts.plain_tensor(data, shape=shape), batch=True)
    return Ciphertext((tensor.serialize(),), v.size, self.fingerprint, shape[-1] if
                      len(shape) > 1 else 1)

  def add(self, ciphertexts: list[Ciphertext]) -> Ciphertext:
    """The slot-wise sum of ciphertexts of one length under this key (ciphertexts only)."""
    if not ciphertexts:
      raise ValueError("CKKS sum of no ciphertexts")
    total = RunningSum(self)
    for ct in ciphertexts:
      total.add(ct)
    return total.ciphertext()

  def decrypt(self, ciphertext: Ciphertext) -> np.ndarray:
    raise ValueError("CKKS decryption needs the secret key: the public key (held by the clients "
                     "and the server) cannot decrypt; ask the KeyHolder")


class RunningSum:
  """The server's sum of uploads as they arrive (deserialized once each, then dropped: memory
  for one upload and the sum, not for the cohort's uploads: 16 MB each for W1)."""

  def __init__(self, public_key: PublicKey):
    self.public_key = public_key
    self._acc, self._first = None, None

  def add(self, ct: Ciphertext):
    pk, ts = self.public_key, tenseal()
    if ct.fingerprint != pk.fingerprint:
      raise ValueError("CKKS sum: a ciphertext is encrypted under another public key")
    if self._first is None:
      self._first = ct
      self._acc = [ts.ckks_tensor_from(pk.context, c) for c in ct.chunks]
      return
    if ct.length != self._first.length:
      raise ValueError(f"CKKS sum: ciphertexts of lengths {self._first.length} and {ct.length}")
    for acc, c in zip(self._acc, ct.chunks):
      acc += ts.ckks_tensor_from(pk.context, c)   # on TenSEAL's thread pool too

  def ciphertext(self) -> Ciphertext:
    if self._first is None:
      raise ValueError("CKKS sum of no ciphertexts")
    return Ciphertext(tuple(a.serialize() for a in self._acc), self._first.length,
                      self.public_key.fingerprint, self._first.num_ciphertexts)


class KeyHolder:
  """Holds a CKKS context with its secret key (made once, e.g. per run).

  ``public_key()`` is what clients and the server get; ``decrypt`` refuses ciphertexts made
  under another key (``ValueError``: decrypting them would give garbage silently). ``threads``:
  TenSEAL's thread pool size, for this context and its public key (default: the CPU count).
  """

  def __init__(self, params: CKKSParams = CKKSParams(), threads: int | None = None):
    check_params(params)
    if threads is not None and (isinstance(threads, bool) or
                                not isinstance(threads, (int, np.integer)) or threads < 1):
      raise ValueError(f"CKKS threads must be a positive integer or None, got {threads!r}")
    ts = tenseal()
    self.threads = threads
    self.params = CKKSParams(int(params[0]), tuple(int(b) for b in params[1]), int(params[2]))
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=self.params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(self.params.coeff_mod_bit_sizes),
                     **_threads(threads))
    ctx.global_scale = 2.0 ** self.params.scale_bits
    self._secret = ctx
    public = ctx.copy()
    public.make_context_public()
    self.public_bytes = public.serialize()
    self.fingerprint = hashlib.sha256(self.public_bytes).digest()[:16]

  def public_key(self) -> PublicKey:
    return PublicKey(self.params, self.public_bytes, self.fingerprint, self.threads)

  def decrypt(self, ciphertext: Ciphertext) -> np.ndarray:
    """``float64 [length]``: the decrypted vector."""
    if ciphertext.fingerprint != self.fingerprint:
      raise ValueError(f"CKKS decryption with the wrong key: the ciphertext is encrypted under "
                       f"public key {ciphertext.fingerprint.hex()}, this key holder's is "
                       f"{self.fingerprint.hex()}")
    ts = tenseal()
    # Each chunk decrypts to [slots, k] (or [slots]): column j is ciphertext j.
    slots = self.params.slots
    parts = [np.asarray(ts.ckks_tensor_from(self._secret, c).decrypt().tolist(), np.float64)
             for c in ciphertext.chunks]
    return np.concatenate([p.reshape(slots, -1).T.ravel() for p in parts])[:ciphertext.length]


class RoundCost(NamedTuple):
  """Measured cost of one round of homomorphic aggregation (host wall-clock seconds)."""
  num_clients: int              # clients that uploaded a ciphertext
  num_params: int
  ciphertexts_per_client: int
  bytes_up_per_client: int      # serialized ciphertexts of one client's update
  plain_bytes_per_client: int   # the float32 update, for comparison
  encrypt_seconds: float        # all clients, one after another
  sum_seconds: float            # the server: deserialize and add every upload
  decrypt_seconds: float        # the key holder
  max_abs_value: float          # largest encrypted coordinate (against params.max_value)
  threads: int = 0              # TenSEAL's thread pool size (encryption and sums)


class Session:
  """One run's homomorphic setting: the key holder, the public key and the cost record.

  Attributes:
    key_holder: :class:`KeyHolder` (the secret key).
    public_key: :class:`PublicKey` (what clients and server use).
    costs: one :class:`RoundCost` per aggregated round, appended on the host.
  """

  def __init__(self, key_holder: KeyHolder):
    self.key_holder = key_holder
    self.public_key = key_holder.public_key()
    self.costs: list[RoundCost] = []

  @property
  def params(self) -> CKKSParams:
    return self.key_holder.params

  def aggregate(self, weighted: np.ndarray, uploaded: np.ndarray) -> np.ndarray:
    """Encrypts rows ``uploaded`` of ``weighted [cap, n]`` one client at a time, adds each
    upload to the server's running sum as it arrives, decrypts the sum; ``float32 [n]`` (zeros when nobody uploaded). Records a
    :class:`RoundCost` (all zeros but the sizes when nobody uploaded: one record per call)."""
    weighted = np.asarray(weighted, np.float64)
    rows = np.flatnonzero(np.asarray(uploaded))
    n = weighted.shape[1]
    if rows.size == 0:
      self.costs.append(RoundCost(0, int(n), 0, 0, 4 * int(n), 0.0, 0.0, 0.0, 0.0,
                                  self.threads))
      return np.zeros(n, np.float32)
    # Client by client: encrypt (a client), add to the running sum (the server, public key and
    # ciphertexts only); the upload is dropped once added.
    total, encrypt_s, sum_s, nbytes = RunningSum(self.public_key), 0.0, 0.0, []
    for i in rows:
      t0 = time.perf_counter()
      upload = self.public_key.encrypt(weighted[i])
      t1 = time.perf_counter()
      total.add(upload)
      t2 = time.perf_counter()
      encrypt_s, sum_s = encrypt_s + (t1 - t0), sum_s + (t2 - t1)
      nbytes.append(upload.nbytes)
    t2 = time.perf_counter()
    summed = total.ciphertext()
    t3 = time.perf_counter()
    out = self.key_holder.decrypt(summed)
    t4 = time.perf_counter()
    self.costs.append(RoundCost(
        int(rows.size), int(n), upload.num_ciphertexts, int(round(np.mean(nbytes))), 4 * int(n),
        encrypt_s, sum_s + (t3 - t2), t4 - t3, float(np.max(np.abs(weighted[rows]))),
        self.threads))
    return out.astype(np.float32)

  @property
  def threads(self) -> int:
    """TenSEAL's thread pool size: the key holder's ``threads``, else the CPU count."""
    return int(self.key_holder.threads or os.cpu_count() or 1)


def session_of(aggregator: Aggregator) -> Session:
  """The :class:`Session` (keys, cost record) of an aggregator made by :func:`ckks_mean`."""
  session = getattr(aggregator.finalize, "session", None)
  if session is None:
    raise ValueError("not a homomorphic aggregator (made by ckks_mean)")
  return session


def cost_callback(aggregator: Aggregator):
  """A ``run`` callback that puts each round's :class:`RoundCost` into the history (keys
  ``he_num_clients``, ``he_ciphertexts_per_client``, ``he_bytes_up_per_client``,
  ``he_plain_bytes_per_client``, ``he_encrypt_seconds``, ``he_sum_seconds``,
  ``he_decrypt_seconds``, ``he_max_abs_value``, ``he_threads`` and the CKKS parameters
  ``he_poly_modulus_degree``, ``he_scale_bits``). One record per round, in order (also with
  ``rounds_per_call > 1``: the block's records are read one per callback call)."""
  session = session_of(aggregator)
  start = len(session.costs)
  seen = [0]

  def callback(r, state, out):
    del r, state, out
    i = start + seen[0]
    if i >= len(session.costs):
      raise ValueError("homomorphic cost_callback: no cost record for this round (is the "
                       "callback's aggregator the one the run uses?)")
    seen[0] += 1
    rec = {f"he_{k}": float(v) for k, v in session.costs[i]._asdict().items()}
    rec.update(he_poly_modulus_degree=float(session.params.poly_modulus_degree),
               he_scale_bits=float(session.params.scale_bits))
    return rec

  return callback


def ckks_mean(clip: float | None = None, poly_modulus_degree: int = 8192,
              coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60), scale_bits: int = 40,
              key_holder: KeyHolder | None = None, threads: int | None = None) -> Aggregator:
  """Weighted mean through CKKS homomorphic encryption (buffering aggregator; see the module
  docstring for the protocol and the threat model).

  Every client slot with weight > 0 is a client that uploads ``Enc((w_c / W) * delta_c)``
  (``delta_c`` first scaled to L2 norm at most ``clip`` if given, all leaves together; ``W`` the
  total weight); the server adds the ciphertexts, the key holder decrypts the sum, which is
  the weighted mean up to CKKS error (~1e-8 sqrt(C) per coordinate). Slots of weight 0 (padding,
  drop-outs, non-finite updates) upload nothing. Encryption, addition and decryption run on the
  host (``io_callback``) in ``finalize``; costs are appended to ``session_of(agg).costs`` (into
  the history with ``fs.run(..., callback=homomorphic.cost_callback(agg))``).

  Args:
    clip: optional L2 bound of each client's update, applied before weighting and encryption.
    poly_modulus_degree: CKKS ring degree N (4096..32768): N/2 values per ciphertext.
    coeff_mod_bit_sizes: bit sizes of the coefficient modulus primes.
    scale_bits: the encoding scale is ``2**scale_bits``.
    key_holder: the key holder (default: a new one, i.e. fresh keys, per aggregator).
    threads: TenSEAL's thread pool size for a new key holder (default: the CPU count); a given
      ``key_holder`` keeps its own.

  Memory ``O(C n)`` (the buffer); host work ``O(C n / N)`` ciphertext operations a round.
  """
  if clip is not None:
    clip = float(clip)
    if not clip > 0 or not math.isfinite(clip):
      raise ValueError(f"ckks_mean clip must be a finite number > 0 or None, got {clip!r}")
  params = CKKSParams(poly_modulus_degree, tuple(coeff_mod_bit_sizes), scale_bits)
  check_params(params)
  if key_holder is None:
    key_holder = KeyHolder(params, threads)
  elif key_holder.params != CKKSParams(int(params[0]), tuple(int(b) for b in params[1]),
                                       int(params[2])):
    raise ValueError(f"ckks_mean: key_holder has parameters {key_holder.params}, not {params}")
  session = Session(key_holder)

  def finalize(state, key=None, client_ids=None):
    del key, client_ids
    valid = state.weights > 0
    w = jnp.where(valid, state.weights, 0.0)
    total_w = jnp.sum(w)
    cap = w.shape[0]
    flat = jnp.concatenate([jnp.reshape(x, (cap, -1)).astype(jnp.float32)
                            for x in jax.tree.leaves(state.updates)], axis=1)
    if clip is not None:
      norm = jnp.sqrt(jnp.sum(flat * flat, axis=1))
      flat = flat * jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))[:, None]
    weighted = flat * (w / jnp.maximum(total_w, 1e-30))[:, None]
    mean = io_callback(session.aggregate, jax.ShapeDtypeStruct((flat.shape[1],), jnp.float32),
                       weighted, valid, ordered=False)
    template = jax.tree.map(lambda x: x[0], state.updates)
    return unflatten(mean, template), total_w

  finalize.session = session
  agg = buffered(lambda updates, valid: updates)   # reuse the buffer; finalize is our own
  return agg._replace(finalize=finalize)
