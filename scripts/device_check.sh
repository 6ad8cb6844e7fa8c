#!/usr/bin/env bash
# The GPU check (issue 11 part 5), run from the repository root on the device machine:
# torch + CUDA, numpy, xxhash, pytest there; no vLLM, no msgspec, no network. Carry `.whl/`
# (msgspec for cp312, see below); logs and JSON go to $OUT.
#   - installs the carried wheels into /tmp/site (only if msgspec is missing)
#   - nvidia-smi, versions
#   - python3 -m pytest -q -m gpu tests/pages/test_gpu_pages.py      (~1 min)
#   - python3 benchmarks/gpu_transfer.py, full size, bounded           (~2-3 min)
# Exit status: 0 only if CUDA was seen, the gpu tests passed and the benchmark ran bit-exact.
# Local dry run (no GPU: tests skip, benchmark on CPU):
#   OUT=/tmp/dc PY=.venv/bin/python BENCH_ARGS=--quick scripts/device_check.sh
# The wheel: python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl msgspec
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/hybridkv-device-out}
PY=${PY:-python3}
BENCH_ARGS=${BENCH_ARGS:-"--budget-s 120"}
mkdir -p "$OUT"
status=0
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

if ! "$PY" -c "import msgspec" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        if ! "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
                >"$OUT/pip.log" 2>&1; then
            log "pip install of .whl/ failed (see pip.log); unzipping the wheels instead"
            for w in .whl/*.whl; do "$PY" -m zipfile -e "$w" /tmp/site >>"$OUT/pip.log" 2>&1; done
        fi
    else
        log "msgspec missing and no .whl/ carried"; status=1
    fi
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}

(nvidia-smi || echo "nvidia-smi not found") >"$OUT/nvidia-smi.txt" 2>&1
head -20 "$OUT/nvidia-smi.txt"
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/env.txt"
import platform, sys
import numpy, torch, xxhash, msgspec
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(),
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
      "numpy", numpy.__version__, "msgspec", msgspec.__version__)
import hybridkv.pages, hybridkv.pages.cuda  # noqa: F401  (must not need vLLM)
assert not [m for m in sys.modules if m.split(".")[0] == "vllm"], "vllm was imported"
PYEOF
[ "${PIPESTATUS[0]}" = 0 ] || { log "environment check failed"; status=1; }
cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[ "$cuda" = 1 ] || log "NO CUDA: gpu tests will skip, the benchmark runs on CPU"

log "pytest -m gpu tests/pages/test_gpu_pages.py"
timeout 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rA tests/pages/test_gpu_pages.py \
    --junitxml="$OUT/pytest_gpu.xml" >"$OUT/pytest_gpu.log" 2>&1
rc=$?
tail -25 "$OUT/pytest_gpu.log"
log "pytest rc=$rc"
[ "$rc" = 0 ] || status=1
if [ "$cuda" = 1 ] && grep -q "skipped" "$OUT/pytest_gpu.log"; then
    log "gpu tests were skipped on a CUDA machine"; status=1
fi

log "benchmarks/gpu_transfer.py $BENCH_ARGS"
# shellcheck disable=SC2086
timeout 210 "$PY" benchmarks/gpu_transfer.py --out "$OUT/gpu_transfer.json" $BENCH_ARGS \
    >"$OUT/gpu_transfer.log" 2>&1
rc=$?
cat "$OUT/gpu_transfer.log"
log "gpu_transfer rc=$rc"
[ "$rc" = 0 ] || status=1
[ "$cuda" = 1 ] || status=1
log "device_check status=$status"
exit $status
