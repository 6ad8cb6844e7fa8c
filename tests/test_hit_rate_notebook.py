"""The hit-rate example notebook executes cleanly, and the hit-rate benchmark's JSON is sound."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "hit_rates.ipynb"
BENCHMARK = ROOT / "benchmarks" / "hit_rate.py"


def _python3_kernel_is_this_python() -> bool:
    """Whether the ``python3`` kernelspec would start this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        return False
    exe = spec.argv[0] if spec.argv else ""
    # jupyter_client substitutes sys.executable for a bare "python" / "python3" / "python3.X"
    v = sys.version_info
    if exe in {"python", f"python{v.major}", f"python{v.major}.{v.minor}"}:
        return True
    return os.path.realpath(exe) == os.path.realpath(sys.executable)


@pytest.fixture
def python3_kernel(tmp_path, monkeypatch):
    """Make sure kernel "python3" is this venv's interpreter, installing nothing."""
    if not _python3_kernel_is_this_python():
        kdir = tmp_path / "jupyter" / "kernels" / "python3"
        kdir.mkdir(parents=True)
        (kdir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)", "language": "python"}))
        monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


def _last_code_output(nb) -> str:
    code = [c for c in nb.cells if c.cell_type == "code"]
    return "".join(o.get("text", "") for o in code[-1].outputs if o.output_type == "stream")


def test_notebook_executes(python3_kernel, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name=python3_kernel,
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) >= 4

    summary = json.loads(_last_code_output(nb))
    fractions = summary["fractions"]
    mt = summary["traces"]["multi_turn"]
    assert set(mt["hit_rate"]) == {"gemma3_27b", "jamba_mini", "qwen3_next_80b"}
    for model, per_policy in mt["hit_rate"].items():
        for f in fractions:
            ga, lru = per_policy["group_aware"][f], per_policy["lru"][f]
            assert isinstance(ga, float) and 0.0 <= ga <= 1.0
            assert ga >= lru - 1e-12, (model, f, ga, lru)
    for trace in summary["traces"].values():
        for model, per_policy in trace["hit_rate"].items():
            ub = trace["unbounded"][model]
            for policy, by_f in per_policy.items():
                for f, rate in by_f.items():
                    assert rate <= ub + 1e-12, (model, policy, f, rate, ub)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("hit_rate_benchmark", BENCHMARK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


CELL_KEYS = {
    "trace", "model", "policy", "budget_fraction", "budget_bytes", "working_set_bytes",
    "requests", "prompt_tokens", "hit_tokens", "token_hit_rate", "flops_saved_fraction",
    "bytes_written", "bytes_read", "bytes_written_per_hit_token", "group_bytes_written",
    "stores_rejected", "stores_skipped", "wall_s",
}


@pytest.mark.fast
def test_benchmark_tiny(tmp_path, capsys):
    bench = _load_benchmark()
    out = tmp_path / "hr.json"
    doc = bench.main(["--traces", "multi_turn", "--models", "jamba_mini", "--max-requests", "40",
                      "--jobs", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(doc))
    assert saved["benchmark"] == "hit_rate" and saved["quick"] is False
    assert isinstance(saved["command"], list) and "--max-requests" in saved["command"]
    assert {"platform", "python", "cpus"} <= set(saved["machine"])

    results = saved["results"]
    # 3 policies x 4 budgets + unbounded, one trace, one model
    assert len(results) == 13
    for c in results:
        assert CELL_KEYS <= set(c), CELL_KEYS - set(c)
        assert c["trace"] == "multi_turn" and c["model"] == "jamba_mini"
        assert c["requests"] == 40
        assert 0.0 <= c["token_hit_rate"] <= 1.0 and 0.0 <= c["flops_saved_fraction"] <= 1.0
        assert sum(c["group_bytes_written"].values()) == c["bytes_written"]
    by = {(c["policy"], c["budget_fraction"]): c for c in results}
    assert set(by) == ({(p, f) for p in ("group_aware", "lru", "watermark")
                        for f in (0.1, 0.25, 0.5, 1.0)} | {("unbounded", None)})
    ws = by["unbounded", None]["working_set_bytes"]
    assert by["unbounded", None]["budget_bytes"] is None
    assert by["lru", 0.25]["budget_bytes"] == int(ws * 0.25)
    ub = by["unbounded", None]["token_hit_rate"]
    assert all(c["token_hit_rate"] <= ub + 1e-12 for c in results)

    # targets are computed from the results of this run
    t = saved["targets"]
    a = {r["model"]: r for r in t["ratio_at_25pct"]["cells"]}
    assert a["gemma3_27b"]["measured"] is False and a["gemma3_27b"]["met"] is None
    j = a["jamba_mini"]
    assert j["measured"] is True
    ga, lru = by["group_aware", 0.25]["token_hit_rate"], by["lru", 0.25]["token_hit_rate"]
    assert j["group_aware"] == ga and j["lru"] == lru
    if lru > 0:
        assert j["ratio"] == pytest.approx(ga / lru)
        assert j["met"] == (ga / lru >= 2.0)
        assert j["unbounded"] == ub
        assert j["max_possible_ratio"] == pytest.approx(ub / lru)
        assert j["ratio"] <= j["max_possible_ratio"]
    assert t["ratio_at_25pct"]["met"] == j["met"]
    b = t["group_aware_ge_lru"]
    assert b["checked"] == 4
    expected = sorted(f for f in (0.1, 0.25, 0.5, 1.0)
                      if by["group_aware", f]["hit_tokens"] < by["lru", f]["hit_tokens"])
    assert sorted(v["budget_fraction"] for v in b["violations"]) == expected
    for v in b["violations"]:
        assert v["margin"] == pytest.approx(v["group_aware"] - v["lru"]) and v["margin"] < 0
    assert b["met"] == (not expected)
    assert "target (a)" in printed and "target (b)" in printed
    assert "jamba_mini @ 25%" in printed


@pytest.mark.fast
def test_benchmark_trace_file(tmp_path):
    from hybridkv.sim.traces import make_trace, save_jsonl

    bench = _load_benchmark()
    path = save_jsonl(make_trace("agentic", block_tokens=32), tmp_path / "agents.jsonl")
    out = tmp_path / "hr.json"
    doc = bench.main(["--trace-file", str(path), "--block-tokens", "32", "--models", "qwen3_next_80b",
                      "--max-requests", "30", "--jobs", "1", "--out", str(out)])
    assert {c["trace"] for c in doc["results"]} == {"agents"}
    assert doc["grid"]["trace_file"] == str(path) and doc["grid"]["block_tokens"] == 32
    assert doc["targets"]["ratio_at_25pct"]["met"] is None  # multi_turn not measured
    assert doc["targets"]["group_aware_ge_lru"]["checked"] == 4
    with pytest.raises(SystemExit):
        bench.main(["--trace-file", str(path), "--block-tokens", "100", "--out", str(out)])


@pytest.mark.slow
def test_policy_overhead_benchmark(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "policy_overhead", ROOT / "benchmarks" / "policy_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "po.json"
    doc = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    rows = doc["victims_scaling"]
    assert {r["model"] for r in rows} == {"gemma3_27b", "jamba_mini", "qwen3_next_80b"}
    for r in rows:
        assert r["chunks"] >= 1000 and r["group_aware_ms"] > 0 and r["lru_ms"] > 0
    for r in doc["headroom"]:
        # freeing headroom can only make eviction decisions rarer
        assert 0 < r["victim_calls_default"] <= r["victim_calls_no_headroom"]
        assert 0 < r["hit_rate_default"] <= 1 and 0 < r["hit_rate_no_headroom"] <= 1
