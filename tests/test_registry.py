"""fedjax_sim.registry: registration, checked construction, option descriptions."""

import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.registry import REQUIRED, Registry, arg_docs


def _registry():
  reg = Registry("widget")

  @reg.register("box")
  def box(width: float, height: float = 1.0, *, label: str | None = None):
    """A box.

    Args:
      width: horizontal size, in
        metres.
      height: vertical size.
      label: shown on top.
    """
    return ("box", width, height, label)

  @reg.register(forwards_to=box)
  def crate(width: float, **kwargs):
    """A crate (other arguments as box)."""
    return ("crate", box(width, **kwargs))

  return reg


def test_make_checks_options_before_building():
  reg = _registry()
  assert reg.make("box", width=2.0) == ("box", 2.0, 1.0, None)
  assert reg.make("crate", width=1.0, label="x") == ("crate", ("box", 1.0, 1.0, "x"))
  with pytest.raises(ValueError, match=r"widget 'box': unknown option 'depth'.*valid options: "
                                       r"width, height, label"):
    reg.make("box", width=1.0, depth=3)
  with pytest.raises(ValueError, match=r"widget 'box': missing required option 'width'"):
    reg.make("box")
  with pytest.raises(ValueError, match=r"unknown widget 'boxx' \(did you mean 'box'\?\); "
                                       "choose from box, crate"):
    reg.make("boxx")
  # forwards_to: only the target's keyword-only options are added (height is positional there)
  with pytest.raises(ValueError, match="unknown option 'height'"):
    reg.make("crate", width=1.0, height=2.0)


def test_schema_has_defaults_annotations_and_docs():
  s = _registry().schema("box")
  assert list(s) == ["width", "height", "label"]
  assert s["width"].required and s["width"].default is REQUIRED and s["width"].annotation is float
  assert s["height"].default == 1.0 and not s["height"].required
  assert s["width"].doc == "horizontal size, in metres."   # continuation lines joined
  assert s["label"].annotation == (str | None) and s["label"].doc == "shown on top."
  assert list(_registry().schema("crate")) == ["width", "label"]


def test_registry_is_a_mapping_and_refuses_a_second_entry_of_a_name():
  reg = _registry()
  assert "box" in reg and sorted(reg) == ["box", "crate"] and len(reg) == 2
  assert reg.names() == ["box", "crate"] and reg["box"](1.0)[0] == "box"
  with pytest.raises(ValueError, match="widget 'box' is already registered"):
    reg.register("box")(lambda: None)


def test_arg_docs_reads_attributes_sections():
  docs = arg_docs(fs.Heterogeneity)
  assert docs["straggler_fraction"].startswith("probability in [0, 1]")


def test_package_registries():
  assert {"fedavg", "fedprox", "scaffold", "fednova", "fedbuff"} <= set(fs.algorithms.REGISTRY)
  assert set(fs.aggregators.REGISTRY) == {"mean", "coordinate_median", "trimmed_mean", "krum",
                                          "norm_bounded_mean", "secure_sum", "ckks_mean"}
  assert {"clip_by_norm", "top_k", "stochastic_quantize", "hadamard_quantize",
          "sign_flip_attack", "scale_attack", "gaussian_attack",
          "local_gaussian_noise"} <= set(fs.transforms.REGISTRY)
  assert "straggler_fraction" in fs.heterogeneity.REGISTRY.schema("default")
  assert {"fashion_mnist", "digits", "synthetic", "shakespeare"} <= set(fs.datasets.REGISTRY)
  # the old names keep working: algorithms.make and the REGISTRY mapping
  algo = fs.algorithms.make("fedprox", client_optimizer=optax.sgd(0.1), mu=0.5)
  assert algo.name == "fedprox" and fs.algorithms.REGISTRY["fedprox"] is fs.algorithms.fedprox
  # fedprox forwards **kwargs to fedavg: its keyword-only options are checked too
  assert fs.algorithms.REGISTRY.schema("fedprox")["batch_size"].doc == "local batch size B."
  with pytest.raises(ValueError, match="algorithm 'fedprox': unknown option 'nu'"):
    fs.algorithms.make("fedprox", nu=0.1)
  with pytest.raises(ValueError, match="aggregator 'krum': missing required option "
                                       "'num_byzantine'"):
    fs.aggregators.REGISTRY.make("krum")
