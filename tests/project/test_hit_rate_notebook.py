"""The hit-rate example notebook executes cleanly, and the hit-rate benchmark's JSON is sound."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.slow
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
    # (3 policies + reference) x 4 budgets + unbounded, one trace, one model
    assert len(results) == 17
    for c in results:
        assert CELL_KEYS <= set(c), CELL_KEYS - set(c)
        assert c["trace"] == "multi_turn" and c["model"] == "jamba_mini"
        assert c["requests"] == 40
        assert 0.0 <= c["token_hit_rate"] <= 1.0 and 0.0 <= c["flops_saved_fraction"] <= 1.0
        assert sum(c["group_bytes_written"].values()) == c["bytes_written"]
    by = {(c["policy"], c["budget_fraction"]): c for c in results}
    assert set(by) == ({(p, f) for p in ("group_aware", "lru", "watermark", "reference")
                        for f in (0.1, 0.25, 0.5, 1.0)} | {("unbounded", None)})
    ws = by["unbounded", None]["working_set_bytes"]
    assert by["unbounded", None]["budget_bytes"] is None
    assert by["lru", 0.25]["budget_bytes"] == int(ws * 0.25)
    ub = by["unbounded", None]["token_hit_rate"]
    assert all(c["token_hit_rate"] <= ub + 1e-12 for c in results)

    # targets are computed from the results of this run
    t = saved["targets"]
    assert set(t) == {"group_aware_vs_reference_25pct", "group_aware_vs_reference_10pct",
                      "group_aware_ge_lru"}
    for f, goal in ((0.25, 0.9), (0.1, 0.8)):
        a = t[f"group_aware_vs_reference_{round(f * 100)}pct"]
        ga, ref = by["group_aware", f]["token_hit_rate"], by["reference", f]["token_hit_rate"]
        assert a["goal"] == goal and len(a["cells"]) == 1
        assert a["figure"] == pytest.approx(ga / ref) and a["met"] == (ga / ref >= goal)
        assert a["worst"] == {"trace": "multi_turn", "model": "jamba_mini"}
        line = f"target group_aware_vs_reference_{round(f * 100)}pct: {ga / ref:.3f} (goal >= {goal})"
        assert line in printed
    b = t["group_aware_ge_lru"]
    assert b["checked"] == 4
    margins = {f: by["group_aware", f]["token_hit_rate"] - by["lru", f]["token_hit_rate"]
               for f in (0.1, 0.25, 0.5, 1.0)}
    assert b["figure"] == pytest.approx(min(margins.values()))
    expected = sorted(f for f in (0.1, 0.25, 0.5, 1.0)
                      if by["group_aware", f]["hit_tokens"] < by["lru", f]["hit_tokens"])
    assert sorted(v["budget_fraction"] for v in b["violations"]) == expected
    assert b["met"] == (not expected)
    assert "target group_aware_ge_lru: " in printed

    # beside the targets: ratios to lru and the reference's strength
    rows = {r["budget_fraction"]: r for r in saved["ratios_vs_lru"]}
    assert set(rows) == {0.1, 0.25}
    lru = by["lru", 0.25]["token_hit_rate"]
    if lru > 0:
        assert rows[0.25]["group_aware_over_lru"] == pytest.approx(
            by["group_aware", 0.25]["token_hit_rate"] / lru)
        assert rows[0.25]["unbounded_over_lru"] == pytest.approx(ub / lru)
        assert rows[0.25]["reference_over_lru"] <= rows[0.25]["unbounded_over_lru"] + 1e-12
    s = saved["reference_strength"]
    assert s["checked"] == 4
    below = [f for f in (0.1, 0.25, 0.5, 1.0) if by["reference", f]["hit_tokens"]
             < max(by[p, f]["hit_tokens"] for p in ("group_aware", "lru", "watermark"))]
    assert [v["budget_fraction"] for v in s["violations"]] == below
    assert "check reference_strength: 4 cells" in printed
    assert "multi_turn x jamba_mini @ 25%" in printed


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
    assert doc["targets"]["group_aware_ge_lru"]["checked"] == 4
    assert len(doc["targets"]["group_aware_vs_reference_25pct"]["cells"]) == 1
    assert "large_grid_minutes" not in doc["targets"]
    with pytest.raises(SystemExit):
        bench.main(["--trace-file", str(path), "--block-tokens", "100", "--out", str(out)])


@pytest.mark.fast
def test_benchmark_trace_file_with_blocks_larger_than_a_chunk(tmp_path):
    from hybridkv.sim.traces import make_trace, save_jsonl

    bench = _load_benchmark()
    path = save_jsonl(make_trace("document_qa", block_tokens=512), tmp_path / "docs.jsonl")
    doc = bench.main(["--trace-file", str(path), "--block-tokens", "512", "--models",
                      "jamba_mini", "--max-requests", "30", "--jobs", "1",
                      "--out", str(tmp_path / "hr.json")])
    assert doc["grid"]["block_tokens"] == 512
    assert max(c["token_hit_rate"] for c in doc["results"]) > 0


@pytest.mark.fast
def test_benchmark_large_scale_reports_grid_minutes(tmp_path, capsys):
    bench = _load_benchmark()
    doc = bench.main(["--scale", "large", "--models", "qwen3_next_80b", "--max-requests", "25",
                      "--jobs", "1", "--out", str(tmp_path / "hr.json")])
    assert doc["grid"]["scale"] == "large" and doc["grid"]["traces"] == ["multi_turn"]
    g = doc["targets"]["large_grid_minutes"]
    assert g["how"] == "extrapolated" and g["goal"] == 30
    per_model = sum(c["wall_s"] for c in doc["results"])
    assert g["figure"] == pytest.approx(per_model * 3 / 2 / 60)
    assert "target large_grid_minutes: " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--scale", "full", "--out", str(tmp_path / "x.json")])


@pytest.mark.slow
def test_policy_overhead_benchmark(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "policy_overhead", ROOT / "benchmarks" / "policy_overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "po.json"
    doc = bench.main(["--quick", "--models", "jamba_mini", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    rows = doc["decisions"]
    assert [r["chunks"] // 1000 for r in rows] == [9, 99]  # about 10K and 100K chunks
    for r in rows:
        assert r["model"] == "jamba_mini" and r["decision_ms_median"] > 0
        assert r["evicted_per_decision"] > 0  # each offer had to evict
    assert rows[0]["scan_decision_ms"] > 0  # the scan-based analysis, timed for comparison
    for r in doc["replays"]:
        # freeing headroom can only make eviction decisions rarer
        assert 0 < r["victim_calls_default"] <= r["victim_calls_no_headroom"]
        assert 0 < r["hit_rate_group_aware"] <= 1 and 0 < r["hit_rate_no_headroom"] <= 1
        assert r["time_ratio"] > 0
    assert set(doc["targets"]) == {"decision_99k_vs_10k_jamba_mini", "replay_group_aware_vs_lru"}