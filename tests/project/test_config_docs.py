"""docs/configuration.md documents every setting, and only real ones (issue 12, part 6).

The doc's two tables are parsed: a ``HybridKVConfig`` field without a row, a
row whose key is no field, a documented default that differs from the code's,
or an example the parser refuses fails here; so does a vLLM pass-through key
missing from (or invented in) the second table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from hybridkv.config import VLLM_KEYS, ConfigError, HybridKVConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
pytestmark = pytest.mark.fast


def table(section: str) -> dict[str, dict[str, str]]:
    """Rows of the first table under ``## section``, keyed by the first column's `key`."""
    text = DOC.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"no section '## {section}' in {DOC.name}"
    lines = [ln for ln in match.group(1).splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[2:]:  # skip the |---| rule
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), f"malformed row: {line}"
        key = re.fullmatch(r"`([a-z_]+)`", cells[0])
        assert key, f"first cell is not a `key`: {line}"
        assert key.group(1) not in rows, f"{key.group(1)} documented twice"
        rows[key.group(1)] = dict(zip(header, cells))
    return rows


def first_code(cell: str) -> str | None:
    m = re.search(r"`([^`]*)`", cell)
    return m.group(1) if m else None


def fields() -> dict[str, msgspec.structs.FieldInfo]:
    return {f.name: f for f in msgspec.structs.fields(HybridKVConfig)}


def test_every_setting_is_documented_and_every_documented_key_exists():
    documented = set(table("hybridkv settings"))
    real = set(fields())
    assert real - documented == set(), "settings missing from docs/configuration.md"
    assert documented - real == set(), "docs/configuration.md documents settings that do not exist"


def test_every_row_is_complete():
    for key, row in table("hybridkv settings").items():
        for column in ("type", "default", "valid values", "meaning", "example"):
            assert row.get(column, "").strip(), f"{key}: empty '{column}'"
        assert len(row["meaning"]) >= 30, f"{key}: the meaning says too little"


def test_documented_defaults_are_the_code_defaults():
    rows = table("hybridkv settings")
    for name, info in fields().items():
        raw = first_code(rows[name]["default"])
        if info.required:
            assert raw is None, f"{name} is required; the doc gives a default {raw!r}"
            continue
        assert raw is not None, f"{name}: the default column has no `value`"
        assert json.loads(raw) == info.default, (name, raw, info.default)


def test_examples_are_accepted_and_change_the_setting(tmp_path):
    rows = table("hybridkv settings")
    defaults = HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path)})
    for key, row in rows.items():
        raw = first_code(row["example"])
        assert raw is not None, f"{key}: the example column has no `value`"
        value = json.loads(raw)
        extra = {"cache_dir": str(tmp_path), key: value}
        try:
            parsed = HybridKVConfig.from_extra_config(extra)
        except ConfigError as exc:
            pytest.fail(f"{key}: documented example {raw} is refused: {exc}")
        if key != "cache_dir":
            assert getattr(parsed, key) != getattr(defaults, key), f"{key}: example is the default"


def test_vllm_pass_through_keys_are_documented():
    assert set(table("vLLM's pass-through keys")) == set(VLLM_KEYS)


def test_the_parser_still_refuses_what_the_doc_says_it_refuses(tmp_path):
    # the doc promises unknown keys (a typo, vLLM 0.33's sync loads) stop the engine
    for key in ("disk_budgt", "sync_load_budget_bytes"):
        with pytest.raises(ConfigError, match=key):
            HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path), key: 1})
