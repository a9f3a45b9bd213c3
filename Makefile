# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install

.PHONY: install browser cluster demo test check bench clean

install: $(STAMP)

# torch: the tested version, the CPU wheel where there is no NVIDIA driver (no multi-GB CUDA
# download), else the CUDA build the driver can run (launch/install_torch.sh). DeepSpeed's CPU
# Adam and shared-memory comm ops are JIT-compiled once here (~2 min), not in the first run.
$(STAMP): pyproject.toml launch/install_torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	launch/install_torch.sh $(BIN)/pip
	$(BIN)/pip install -q -e '.[dev,hf,eval]'
	$(BIN)/sabiscale build-ops
	touch $(STAMP)

demo: install
	$(BIN)/sabiscale demo

# Best effort: Debian's chromium for the browser check of the MLflow UI (needs root and apt;
# without it that one check skips and says why).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the MLflow browser check will be skipped"

# Best effort: Debian's Slurm and munge, so the tests can start a real two-node Slurm cluster on
# this host and sbatch launch/slurm.sbatch (without root/apt those tests skip and say why).
cluster:
	@command -v slurmctld >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq || true; } && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  slurm-wlm munge >/dev/null; } || echo "slurm could not be installed: the Slurm test will be skipped"

test: install browser cluster
	$(BIN)/pytest -q tests

# The developers' loop: every test but the integration and system tiers (still the real DeepSpeed
# engine, in process), a few minutes on 2 cores. `make test` runs all three tiers.
check: install
	$(BIN)/pytest -q -m "not integration and not system" tests

# Benchmarks are commands, not tests: sabiscale vs the HF Trainer peer on the standard workload.
bench: install
	$(BIN)/pip install -q -e '.[dev,hf,eval,bench]'
	$(BIN)/python benchmarks/step_throughput.py

clean:
	rm -rf runs .pytest_cache
