"""Multi-process (multi-host) runs: one simulation spread over several JAX processes.

JAX's multi-controller model: every process runs the *same* Python program; after
:func:`initialize` (a wrapper of :func:`jax.distributed.initialize`), ``jax.devices()`` lists the
devices of all processes and a jitted program over a mesh of them runs as one SPMD program, each
process executing its own devices' share. :func:`fedjax_sim.engine.make_round` with
``mesh=global_mesh()`` splits the cohort's client axis over that mesh (``jax.shard_map``), so
each process trains its slice of the cohort; the partial aggregates are summed by a cross-process
all-reduce (NCCL on GPUs, gloo over TCP on CPUs). Every process holds the whole population and
the (small) server state, replicated; results equal the single-process run up to float
summation order.

The steps, which :func:`fedjax_sim.experiment.run_rounds` performs and :func:`fedjax_sim.run` performs when
``jax.process_count() > 1``::

  distributed.initialize()                         # before any other JAX call
  mesh = distributed.global_mesh()                 # 1-D "clients" mesh over all processes' devices
  state, data, key = distributed.replicate((state, data, key), mesh)   # same values everywhere
  step = jax.jit(round_fn, out_shardings=distributed.replicated(mesh))
  state, out = step(state, data, key)
  metrics = distributed.fetch(out.metrics)         # host numpy, on every process

See ``docs/multihost.md`` for launching on a cluster (one command per host, SLURM).
"""

from __future__ import annotations

import os

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Environment variables read by :func:`initialize` when its arguments are None (JAX's own
# JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS are honoured too, as are SLURM, Open MPI and
# Cloud TPU environments, which jax.distributed.initialize detects by itself).
ENV_COORDINATOR = "FEDJAX_SIM_COORDINATOR"          # "host:port" of process 0
ENV_NUM_PROCESSES = "FEDJAX_SIM_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDJAX_SIM_PROCESS_ID"
ENV_LOCAL_DEVICE_COUNT = "FEDJAX_SIM_LOCAL_DEVICE_COUNT"   # CPU devices per process

_AUTO_DETECTED_ENVS = ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "PMIX_RANK",
                       "OMPI_COMM_WORLD_RANK", "TPU_WORKER_HOSTNAMES")


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  if v is None or v == "":
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"environment variable {name}={v!r} must be an integer") from None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_count: int | None = None, *,
               local_device_ids: int | Sequence[int] | None = None,
               cpu_collectives: str = "gloo", initialization_timeout: int = 300) -> None:
  """Joins this process to a multi-process JAX run (:func:`jax.distributed.initialize`).

  Call it once per process, before any other JAX computation (it fixes the device list). With
  ``num_processes == 1`` it does nothing, so a script can call it unconditionally.

  Args:
    coordinator_address: ``"host:port"`` of process 0, which starts the coordination service
      there (every process passes the same address). Default: ``$FEDJAX_SIM_COORDINATOR``, then
      ``$JAX_COORDINATOR_ADDRESS``, then JAX's cluster auto-detection (SLURM, Open MPI, TPU).
    num_processes: number of processes. Default: ``$FEDJAX_SIM_NUM_PROCESSES`` or auto-detected.
    process_id: this process's rank in ``[0, num_processes)``. Default:
      ``$FEDJAX_SIM_PROCESS_ID`` or auto-detected.
    local_device_count: CPU only: the number of CPU devices this process creates (the
      ``jax_num_cpu_devices`` option, like ``--xla_force_host_platform_device_count``). Default:
      ``$FEDJAX_SIM_LOCAL_DEVICE_COUNT``, else JAX's default (one, or the XLA flag's value).
      GPU processes use their visible GPUs (or ``local_device_ids``).
    local_device_ids: restricts the accelerators this process uses (e.g. one GPU per process
      when several processes share a host); passed to :func:`jax.distributed.initialize`.
    cpu_collectives: cross-process collectives on CPU devices: ``"gloo"`` (TCP, no extra
      dependency) or ``"mpi"`` (needs an MPI library; launch with ``mpirun``).
    initialization_timeout: seconds to wait for all processes to join.

  Raises:
    ValueError: when the coordinator, process count or rank can neither be read from the
      arguments/environment nor auto-detected.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if local_device_count is None:
    local_device_count = _env_int(ENV_LOCAL_DEVICE_COUNT)
  if jax.distributed.is_initialized():
    return
  if local_device_count is not None:
    cpu_devices(int(local_device_count))
  if num_processes == 1:
    return
  if cpu_collectives not in ("gloo", "mpi"):
    raise ValueError(f"cpu_collectives must be 'gloo' or 'mpi', got {cpu_collectives!r}")
  # Without it, a CPU client has no cross-process collectives and the round's all-reduce fails.
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  detectable = any(v in os.environ for v in _AUTO_DETECTED_ENVS)
  if (None in (coordinator_address, num_processes, process_id) and not detectable
      and not os.environ.get("JAX_COORDINATOR_ADDRESS")):
    raise ValueError(
        "distributed.initialize needs the coordinator address, the number of processes and this "
        f"process's id: pass them, set ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES} and "
        f"${ENV_PROCESS_ID}, or launch under SLURM / Open MPI (auto-detected); got "
        f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
        f"process_id={process_id!r}")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids,
                             initialization_timeout=initialization_timeout)


def backends_started() -> bool:
  """Whether JAX's backends (and so its device list) have started in this process.

  The one use of a JAX internal in the package: JAX 0.10 has no public query for this (asked for
  in jax-ml/jax#23320), and calling any public device API to find out would start the backends,
  fixing the device count that :func:`cpu_devices` is about to set. Kept in this one function so
  that a public replacement, when JAX has one, is a one-line change.
  """
  from jax._src import xla_bridge
  return bool(xla_bridge.backends_are_initialized())


def accelerator_expected() -> bool:
  """Whether JAX's default backend is (or, before it starts, will be) a GPU or TPU.

  Once the backends have started this is ``jax.default_backend() != "cpu"``. Before, starting
  them to ask would fix the CPU device count, so it is judged from the configuration: the first
  of ``JAX_PLATFORMS`` / ``jax_platforms`` if set, else whether an accelerator plugin is installed
  (a ``jax_plugins`` entry point or module, e.g. ``jax-cuda12-plugin``, or ``libtpu``). A plugin
  installed on a host without the accelerator makes this True while JAX falls back to the CPU:
  only the default CPU split is then lost.
  """
  import importlib.metadata
  import importlib.util
  import pkgutil
  if backends_started():
    return jax.default_backend() != "cpu"
  platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() != "cpu"
  if list(importlib.metadata.entry_points(group="jax_plugins")):
    return True
  try:
    import jax_plugins   # namespace package of the CUDA/ROCm plugins
    if any(pkgutil.iter_modules(jax_plugins.__path__)):
      return True
  except ImportError:
    pass
  return importlib.util.find_spec("libtpu") is not None


def cpu_devices(n: int | None = None) -> int:
  """Splits this host's CPU into ``n`` JAX devices (default: one per core) for one process.

  XLA:CPU runs one program per device, each on the shared thread pool. A vectorized round of
  many small per-client matmuls keeps one device's pool threads waiting on each other; with one
  device per core, :func:`fedjax_sim.run` splits the cohort over the devices
  (``num_devices``) and the cores work on different clients at once. W1 at C=1000 on the 2-core
  CI machine: 1.57 s/round on one device, 1.18 s on two (``benchmarks/w1_w2.py``). Results equal
  the one-device run up to float summation order.

  Call it before any JAX computation (it sets ``jax_num_cpu_devices``, which fixes the device
  list when the CPU backend starts). The default applies to CPU hosts only: where JAX is
  expected to run on an accelerator (:func:`accelerator_expected`), it sets nothing (the CPU
  devices would not train anyway) and returns JAX's own CPU device count.

  Args:
    n: number of CPU devices. Default ``None``: one per core (``os.cpu_count()``) if the backend
      has not started yet and will be a CPU, else whatever it started with or will start with
      (no error).

  Returns:
    The number of CPU devices JAX has or will have.

  Raises:
    ValueError: ``n < 1``, or an explicit ``n`` when the CPU backend has already started with a
      different count.
  """
  explicit = n is not None
  if not explicit and accelerator_expected():
    if backends_started():
      return len(jax.devices("cpu"))
    return max(1, int(jax.config.jax_num_cpu_devices))
  n = n if explicit else (os.cpu_count() or 1)
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"cpu_devices needs a positive integer, got {n!r}")
  cores = os.cpu_count() or 1
  if n > cores:
    # More devices than cores only adds overhead, and in the hundreds XLA:CPU aborts the process
    # (exit 134) instead of raising. Tests wanting more devices can still set XLA_FLAGS.
    raise ValueError(f"cpu_devices={n} but this machine has {cores} CPU core(s); use at most "
                     f"{cores} (one device per core)")
  if backends_started():
    have = len(jax.devices("cpu"))
    if not explicit:
      return have
    if have != n:
      raise ValueError(f"cpu_devices({n}): JAX's CPU backend already started with {have} "
                       "device(s); call it before any JAX computation (or set "
                       f"XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    return n
  jax.config.update("jax_num_cpu_devices", n)
  return n


def shutdown() -> None:
  """Leaves the multi-process run (:func:`jax.distributed.shutdown`); a no-op if not in one."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def is_multiprocess() -> bool:
  """Whether this program runs as one of several JAX processes."""
  return jax.process_count() > 1


def is_main_process() -> bool:
  """True on process 0 (the one that should print, plot and write files)."""
  return jax.process_index() == 0


def global_mesh(num_devices: int | None = None) -> Mesh:
  """The 1-D ``"clients"`` mesh over the devices of all processes (see
  :func:`fedjax_sim.engine.client_mesh`, of which it is the multi-process form).

  ``jax.devices()`` lists process 0's devices first, so with D devices each process holds a
  contiguous block of the cohort. ``num_devices`` (default: all) may only be smaller in a
  single-process run: every process must own part of the mesh.
  """
  devices = jax.devices()
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(f"num_devices={n} but only {len(devices)} device(s) exist")
  devices = devices[:n]
  owners = {d.process_index for d in devices}
  if len(owners) != jax.process_count():
    raise ValueError(f"a mesh of {n} device(s) leaves out some of the {jax.process_count()} "
                     f"processes (each needs a device in it): use all {len(jax.devices())}")
  return Mesh(np.array(devices), ("clients",))


def replicated(mesh: Mesh) -> NamedSharding:
  """The fully replicated sharding over ``mesh`` (every device holds the whole value)."""
  return NamedSharding(mesh, PartitionSpec())


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Turns host-local values into global, fully replicated ``jax.Array`` s over ``mesh``.

  Every process must call it with identical values (same data, same seed): each process only
  copies its own value onto its own devices, nothing is exchanged or checked. Leaves may be
  numpy arrays, Python scalars, local ``jax.Array`` s or typed PRNG keys; leaves already
  replicated over ``mesh`` are returned as they are. ``None`` leaves stay ``None``.
  """
  sharding = replicated(mesh)
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]

  def one(x):
    if isinstance(x, jax.Array):
      if x.sharding == sharding:
        return x
      if not x.is_fully_addressable:
        raise ValueError(f"replicate: a global array with sharding {x.sharding} cannot be "
                         "replicated from process-local data; fetch() it first")
    else:
      x = jnp.asarray(x) if np.isscalar(x) else np.asarray(x)
    # device_put to a multi-process sharding refuses typed PRNG keys; building the global array
    # from one copy per local device works for every dtype.
    return jax.make_array_from_single_device_arrays(
        x.shape, sharding, [jax.device_put(x, d) for d in local])

  return jax.tree.map(one, tree)


def fetch(tree: Any) -> Any:
  """Brings (possibly global) arrays back to host numpy on every process.

  Replicated and process-local arrays are read from a local copy; arrays sharded over other
  processes' devices are gathered with
  :func:`jax.experimental.multihost_utils.process_allgather` (a collective: then every process
  must call :func:`fetch` on the same tree). PRNG keys come back as their raw key data.
  """

  def one(x):
    if not isinstance(x, jax.Array):
      return x
    if _is_key(x):
      x = jax.random.key_data(x)
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return multihost_utils.process_allgather(x)

  return jax.tree.map(one, tree)


def sync(name: str) -> None:
  """A barrier: returns once every process has called ``sync(name)``."""
  if is_multiprocess():
    multihost_utils.sync_global_devices(name)
