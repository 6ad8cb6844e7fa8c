"""Configuration: every bad setting fails at start with a message naming key and fix."""

from __future__ import annotations

import os

import pytest

from hybridkv.config import ConfigError, HybridKVConfig, parse_size

pytestmark = pytest.mark.fast


@pytest.mark.parametrize("text,expected", [
    ("200GiB", 200 * 2**30), ("1.5TB", 1_500_000_000_000), ("512MiB", 512 * 2**20),
    ("1048576", 1048576), (4096, 4096), (" 10 kib ", 10240),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["-1GiB", "lots", "10 parsecs", -5, True, "1e3GB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        parse_size(bad, "disk_budget")


def test_defaults(tmp_path):
    c = HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path), "spec_name": "x",
                                          "blocks_per_chunk": 2})
    assert c.cache_dir == str(tmp_path) and c.disk_budget is None
    assert c.durability == "none" and c.file_mode == 0o600
    assert c.eviction_policy == "group_aware" and c.eviction_headroom == 0.02


@pytest.mark.parametrize("extra,names", [
    ({"cache_dir": "/x", "disk_budgt": "1GiB"}, "disk_budgt"),
    ({"cache_dir": "/x", "disk_budget": "-3GiB"}, "disk_budget"),
    ({"cache_dir": "/x", "disk_budget": "soon"}, "disk_budget"),
    ({"cache_dir": "/x", "disk_budget": 0}, "disk_budget"),
    ({"cache_dir": "/x", "durability": "paranoid"}, "durability"),
    ({"cache_dir": "/x", "file_mode": "rw-r--r--"}, "file_mode"),
    ({"cache_dir": "/x", "io_threads": 0}, "io_threads"),
    ({"cache_dir": "/x", "eviction_policy": "fifo"}, "eviction_policy"),
    ({"cache_dir": "/x", "checkpoint_interval": -1}, "checkpoint_interval"),
    ({"cache_dir": "/x", "eviction_headroom": 0.9}, "eviction_headroom"),
    ({"cache_dir": "/x", "eviction_headroom": "2%"}, "eviction_headroom"),
    ({}, "cache_dir"),
])
def test_bad_settings_name_the_key(extra, names, monkeypatch):
    monkeypatch.delenv("HYBRIDKV_CACHE_DIR", raising=False)
    with pytest.raises(ConfigError, match=names):
        HybridKVConfig.from_extra_config(extra)


def test_modes_and_budget(tmp_path):
    c = HybridKVConfig.from_extra_config({"cache_dir": str(tmp_path), "file_mode": "0o640",
                                          "disk_budget": "2GiB", "durability": "full",
                                          "eviction_headroom": 0})
    assert c.file_mode == 0o640 and c.disk_budget == 2 * 2**30 and c.durability == "full"
    assert c.eviction_headroom == 0.0


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="not writable"):
        HybridKVConfig.from_extra_config({"cache_dir": str(ro)}).check_directory()


def test_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cache_dir"):
        HybridKVConfig.from_extra_config({"cache_dir": str(blocker / "sub")}).check_directory()


@pytest.mark.parametrize("key,bad", [
    ("durability", "paranoid"), ("durability", None), ("file_mode", 0o1000), ("dir_mode", True),
    ("io_threads", 257), ("io_threads", 2.0), ("io_mode", "mmap"), ("integrity_key_file", ""),
    ("refresh_interval", -0.5), ("refresh_interval", float("nan")), ("refresh_interval", "2"),
    ("eviction_policy", 3), ("eviction_policy", "fifo"), ("checkpoint_interval", 1.5),
    ("eviction_headroom", True), ("snapshot_interval", float("inf")), ("fleet", "yes"),
    ("fleet_interval", 3601), ("fleet_lease_ttl", None), ("disk_budget", float("nan")),
])
def test_every_refusal_starts_with_the_key_and_shows_the_value(key, bad):
    with pytest.raises(ConfigError, match=f"^{key}: ") as info:
        HybridKVConfig.from_extra_config({"cache_dir": "/x", key: bad})
    assert "\n" not in str(info.value)
    if key != "disk_budget":  # parse_size words its own refusals
        assert str(info.value).endswith(f"got {bad!r}"), str(info.value)


def test_every_unknown_key_is_listed_with_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        HybridKVConfig.from_extra_config({"cache_dir": "/x", "zz": 1, "disk_budgt": 2,
                                          "spec_name": "vLLM's own"})
    msg = str(info.value)
    assert msg.startswith("unknown hybridkv setting(s) ['disk_budgt', 'zz']"), msg
    assert "'disk_budget'" in msg and "'spec_name'" in msg


def test_accepted_spellings(tmp_path, monkeypatch):
    c = HybridKVConfig.from_extra_config({
        "cache_dir": tmp_path, "integrity_key_file": tmp_path / "k", "disk_budget": "1.5TB",
        "dir_mode": "750", "file_mode": 0o644, "fleet": True, "refresh_interval": 1})
    assert c.cache_dir == str(tmp_path) and c.integrity_key_file == str(tmp_path / "k")
    assert c.disk_budget == 1_500_000_000_000 and c.dir_mode == 0o750 and c.file_mode == 0o644
    assert c.fleet == "on" and c.fleet_enabled
    assert c.refresh_interval == 1.0 and isinstance(c.refresh_interval, float)
    assert HybridKVConfig.from_extra_config({"cache_dir": "/x", "fleet": False}).fleet == "off"
    assert HybridKVConfig.from_extra_config({"cache_dir": "/x", "disk_budget": None,
                                             "integrity_key_file": None}).disk_budget is None
    monkeypatch.setenv("HYBRIDKV_CACHE_DIR", str(tmp_path))
    assert HybridKVConfig.from_extra_config({}).cache_dir == str(tmp_path)
