"""Running a resolved config: one run per seed, outputs written, a summary over the seeds."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from fedjax_sim.cli.build import load_data, make_algorithm, make_heterogeneity, run_title
from fedjax_sim.cli.output import check_writable
from fedjax_sim.cli.resolve import experiment_identity, to_dict, to_toml
from fedjax_sim.cli.schema import Config


def _client_eval_callback(cfg: Config, model, train):
  """A ``run`` callback that evaluates the global model on every client at evaluation rounds.

  It returns the summary (``client_accuracy_mean``, ``_p10``, ``_p50``, ``_p90``), which ``run``
  adds to the round's history record, so the columns are checkpointed with the history and
  survive a kill and resume."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fedjax_sim import evaluation
  from fedjax_sim.models.core import label_dtype
  from fedjax_sim.history import CLIENT_PREFIX
  f = evaluation.make_client_evaluate(model, train.max_client_size)
  arrays = (jnp.asarray(train.arrays["x"]), jnp.asarray(train.arrays["y"], label_dtype(model)),
            jnp.asarray(train.offsets[:-1], jnp.int32), jnp.asarray(train.sizes, jnp.int32))

  def callback(r, state, _):
    if r % cfg.eval_every and r != cfg.rounds:
      return
    acc = np.asarray(jax.device_get(f(state.params, *arrays))["accuracy"], np.float64)
    summary = {"accuracy_mean": float(acc.mean()),
               **{f"accuracy_p{q}": float(np.percentile(acc, q)) for q in (10, 50, 90)}}
    return {CLIENT_PREFIX + k: v for k, v in summary.items()}

  return callback


def run_one(cfg: Config, seed: int, out: Path, header: str,
            subfolder: str | None = None) -> dict[str, Any]:
  """One run with ``seed`` into ``out`` (checkpoints in ``checkpoint.dir/subfolder``)."""
  import fedjax_sim as fs
  from fedjax_sim import files

  cfg = dataclasses.replace(cfg, seed=seed, out=str(out),
                            checkpoint=dataclasses.replace(cfg.checkpoint))
  if subfolder and cfg.checkpoint.dir is not None:
    cfg.checkpoint.dir = str(Path(cfg.checkpoint.dir) / subfolder)
  check_writable(out)
  resolved = to_dict(cfg)
  files.write_text(out / "config.toml", to_toml(resolved, header))
  train, test, input_shape = load_data(cfg, seed)
  model = fs.models.make(cfg.model, tuple(input_shape), 10)
  algo = make_algorithm(cfg)
  import jax
  print(f"{train!r}\nmodel {model.name}, {algo.name}, {cfg.rounds} rounds x {cfg.cohort_size} "
        f"clients, seed {seed}, {jax.device_count()} {jax.default_backend()} device(s) -> {out}")
  callback = _client_eval_callback(cfg, model, train) if cfg.client_eval else None
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always", RuntimeWarning)
    res = train_algorithm(cfg, algo, model, train, test, seed, callback, resolved)
  diverged = False
  for w in caught:   # one line each, like every other message of the command line
    diverged |= str(w.message).startswith("training diverged")
    print(f"warning: seed {seed}: {' '.join(str(w.message).split())}", file=sys.stderr)
  h = res.history
  fs.checkpoint.save_params(out / "final_params.msgpack", res.params)
  overrides = getattr(res, "overrides", None)   # resume overrides (none for fs.run_async)
  files.write_text(out / "config.json", json.dumps(
      {**resolved, "compile_seconds": res.compile_seconds,
       **({"resume_overrides": overrides} if overrides else {})}, indent=2))
  h.to_json(out / "history.json")
  h.plot(out / "history.png", label=f"{algo.name} seed {seed}", title=run_title(cfg, train))
  acc, loss = final_value(h, "test_accuracy"), final_value(h, "test_loss")
  if not math.isfinite(loss) and not diverged:
    # not evaluated at all, say (no eval data): the result is unusable all the same
    diverged = True
    print(f"warning: seed {seed}: the final test loss is {loss} (diverged)", file=sys.stderr)
  secs = float(h["seconds"][1:].mean() if cfg.rounds > 1 else h["seconds"][0])
  if model.is_regression and "test_r2" in h:   # no accuracy: the MSE and R^2 instead
    print(f"final test MSE {final_value(h, 'test_mse'):.4f}, R^2 {final_value(h, 'test_r2'):.4f} after "
          f"{cfg.rounds} rounds")
  print(f"final test accuracy {acc:.4f} (test loss {loss:.4f}) after "
        f"{cfg.rounds} rounds; {secs:.3f} s/round, compile {res.compile_seconds:.1f} s"
        f"{' -- DIVERGED' if diverged else ''}")
  print(f"wrote {out / 'config.toml'}, {out / 'history.json'}, {out / 'history.png'}, "
        f"{out / 'config.json'}, {out / 'final_params.msgpack'}")
  return {"seed": seed, "history": h, "test_accuracy": acc, "diverged": diverged}


def train_algorithm(cfg: Config, algo, model, train, test, seed: int, callback,
                    resolved: dict[str, Any]):
  """``fs.run`` of a synchronous algorithm, ``fs.run_async`` (``rounds`` server steps) of an
  asynchronous one (fedbuff). Both results have params, history and compile_seconds."""
  import fedjax_sim as fs
  if hasattr(algo, "buffer_size"):   # fedbuff's AsyncConfig
    return fs.run_async(algo, model, train, server_steps=cfg.rounds, eval_data=test,
                        eval_every=cfg.eval_every, seed=seed, chunk_size=cfg.chunk_size,
                        steps_per_call=cfg.rounds_per_call, progress=cfg.progress,
                        callback=callback)
  return fs.run(algo, model, train, rounds=cfg.rounds, cohort_size=cfg.cohort_size,
                eval_data=test, eval_every=cfg.eval_every, seed=seed, chunk_size=cfg.chunk_size,
                rounds_per_call=cfg.rounds_per_call, progress=cfg.progress, callback=callback,
                checkpoint_dir=cfg.checkpoint.dir, checkpoint_every=cfg.checkpoint.every,
                resume="override" if cfg.checkpoint.override else cfg.checkpoint.resume,
                experiment=experiment_identity(resolved), heterogeneity=make_heterogeneity(cfg))


def final_value(h, key: str) -> float:
  """The value of ``key`` at the last evaluation: NaN/inf included (a diverged run's test loss
  is NaN from some round on, and that is its result), NaN if never evaluated."""
  import numpy as np
  if key not in h or "test_accuracy" not in h:
    return math.nan
  evaluated = ~np.isnan(h["test_accuracy"]) | ~np.isnan(h[key])
  return float(h[key][evaluated][-1]) if evaluated.any() else math.nan


def run_seeds(cfg: Config, out: Path, header: str) -> int:
  from fedjax_sim import files
  seeds = cfg.seeds
  if len(seeds) == 1:
    run_one(cfg, seeds[0], out, header)
    return 0
  files.write_text(out / "config.toml", to_toml(to_dict(cfg), header))
  results = [run_one(cfg, s, out / f"seed-{s}", header, f"seed-{s}") for s in seeds]
  from fedjax_sim.history import plot_histories
  plot_histories({f"seed {r['seed']}": r["history"] for r in results}, path=out / "history.png",
                 title=run_title(cfg, None))
  accs = [r["test_accuracy"] for r in results]
  diverged = [r["seed"] for r in results if r["diverged"]]
  # mean and std over the seeds that have a finite accuracy (a diverged run usually has one:
  # chance level, which belongs in the spread); JSON has no NaN, so missing values are null
  ok = [a for a in accs if math.isfinite(a)]
  mean = sum(ok) / len(ok) if ok else math.nan
  std = (sum((a - mean) ** 2 for a in ok) / max(len(ok) - 1, 1)) ** 0.5 if ok else math.nan
  finite_or_none = lambda v: v if math.isfinite(v) else None  # noqa: E731
  files.write_text(out / "summary.json", json.dumps(
      {"seeds": seeds, "final_test_accuracy": [finite_or_none(a) for a in accs],
       "mean": finite_or_none(mean), "std": finite_or_none(std), "diverged": diverged},
      indent=2))
  print(f"{len(seeds)} seeds: final test accuracy {mean:.4f} +- {std:.4f}"
        f"{f' (diverged: seed {diverged})' if diverged else ''}; wrote "
        f"{out / 'summary.json'}, {out / 'history.png'}")
  return 0


