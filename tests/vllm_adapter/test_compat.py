"""hybridkv against the installed vLLM (0.32 here; ``make compat`` runs it against 0.33).

- the one private vLLM attribute hybridkv still reads exists and means what
  ``hybridkv.vllm.compat`` says; no other module reads a private attribute of vLLM;
- the installed vLLM is one the ``vllm`` extra allows;
- the connector's public-API replacements for the private reads work on a
  real ``Scheduler``: a load that keeps failing is tried once per request (no
  reload loop) and nothing is left in the connector's own job maps.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from harness import PROMPTS, first_run, jamba_specs, oracle_hit
from test_scheduler_harness import engine, model_dir  # noqa: F401 (model_dir: the shared fixture)

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
#: private vLLM attributes hybridkv used to read; now only compat.py may name one
PRIVATE = {"_offload_key_positions", "_load_jobs", "_req_status"}


def test_the_private_read_left_exists_in_this_vllm():
    from vllm.v1.kv_offload.base import ReqContext

    from hybridkv.vllm import compat

    assert compat.missing() == [], compat.describe()
    ctx = ReqContext("r")
    ctx.set_offload_key_position(b"k1", 16)  # vLLM's public writer
    ctx.set_offload_key_position(b"k2", 32)
    assert dict(compat.request_key_positions(ctx)) == {b"k1": 16, b"k2": 32}
    assert compat.request_key_positions(ReqContext("empty")) == {}


def test_only_compat_names_private_vllm_attributes():
    offenders = {}
    for path in sorted((ROOT / "hybridkv").rglob("*.py")):
        if path.name == "compat.py":
            continue
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
                found.add(node.attr)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in (
                    "getattr", "setattr", "hasattr"):
                found |= {a.value for a in node.args
                          if isinstance(a, ast.Constant) and a.value in PRIVATE}
        if found:
            offenders[str(path.relative_to(ROOT))] = sorted(found)
    assert offenders == {}


def test_installed_vllm_is_within_the_extra_and_supported():
    from packaging.specifiers import SpecifierSet

    from hybridkv.vllm import compat

    installed = compat.vllm_version().split("+")[0]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    (spec,) = [re.sub(r"^vllm", "", d) for d in extras["vllm"] if d.startswith("vllm")]
    assert installed in SpecifierSet(spec), (installed, spec)
    assert ".".join(installed.split(".")[:2]) in compat.SUPPORTED


def test_a_load_that_keeps_failing_is_tried_once_per_request(model_dir, tmp_path):
    """EACCES on one chunk, every time: not the file's fault, so it stays listed. The
    request that hit it recomputes and never reloads (no loop); the connector's own
    maps are empty once the request is done."""
    from hybridkv.testing.faults import FaultyFileIO, parse_rules

    specs, block = jamba_specs()

    def make():
        return engine(model_dir, tmp_path / "kv", specs, block_size=block, snapshot_interval=0)

    first_run(make)
    e = make()
    prompt = PROMPTS["c"]
    hit = oracle_hit(e, prompt)
    assert hit > 0
    full = next(g for g in e.groups if g.kind == "full")
    victim = e.chunk_path(prompt, full.gid, full.block_size * e.blocks_per_chunk)
    store = e.worker.connector_worker.worker.store
    store.io = FaultyFileIO(parse_rules([{"op": "read", "errno": "EACCES",
                                          "keys": [victim.name.split(".")[0]]}]))
    e.serve({"c": prompt})  # drains: without the no-reload rule the retry would loop
    assert e.external_tokens["c"] == hit  # the index said HIT
    assert e.start_tokens["c"] == 0  # the load failed: recomputed from token 0
    assert e.manager.counters.get("requests_load_failed") == 1
    worker = e.worker.connector_worker.worker
    assert worker.counters.get("load_failures") == 1  # the failing chunk was read once
    assert victim.exists(), "a permission error is not the file's fault"
    assert e.connector._no_reload == set()
    assert e.worker._load_requests == {}
    e.shutdown()
