"""Actions a session runs between prompts: the fault-injection suite's hands.

A TESTING AID (``hybridkv.testing.session.run_scripted_session`` runs it when
prompts carry ``before`` / ``after`` lists). It runs in the session's front-end process, which is not the engine
process, so it can damage chunk files, switch faults injected by
``FaultInjectingConnector`` (``hybridkv.testing.faults``) or make the cache
directory read-only while the engine keeps running. Each action is a
dict with an ``op``:

- ``settle`` ``quiet=1.0``: wait until every store this engine started has
  completed (worker ``chunks_written + store_failures`` == manager
  ``chunks_stored + stores_failed``, no temp file left) and neither the
  counters nor the visible chunk files changed for ``quiet`` seconds, so the
  next prompt's lookups see them. (The counters are also equal before the
  engine has issued a finished request's last stores; on a loaded machine
  that gap lasted longer than the 0.2 s this used to wait.)
- ``snapshot`` ``label``: remember the chunk files that appeared since the
  previous snapshot under ``label``.
- ``reset_prefix_cache``: empty vLLM's own prefix cache, so that the next
  prompt can only get cached tokens from disk.
- ``damage`` ``label, how, kind="full", pick="middle"``: damage snapshot files
  in place: ``bitflip`` (one payload bit), ``truncate``, ``other_layout`` (the
  header names another layout fingerprint), ``future_version``, ``delete``.
  ``kind`` selects groups by kind (``full`` / ``sliding`` / ``state`` / ``any``),
  ``pick`` one file by position (``first``, ``middle``, ``last``) or ``all``.
- ``faults`` ``rules``: write the session's rules file (``--faults-file``); a
  rule may carry ``target: {label, kind, pick}``, replaced by the picked files'
  ``keys``. ``rules: []`` switches faults off.
- ``remount`` ``mode: ro|rw``: bind-mount the cache directory read-only or back
  (needs root in a private mount namespace: ``unshare --mount``).
- ``barrier`` ``dir, n``: wait until ``n`` sessions reached this point.
- ``disk_usage``: record the bytes of the visible chunk files (and of temp
  files) under the layout directory, per group.
- ``free_space``: the cache filesystem's free and total bytes now and the lowest
  free space seen since the first ``free_space`` (sampled every 10 ms in a thread,
  ``hybridkv.testing.disk_fill``; paused while ``fill`` itself fills).
- ``fill`` ``keep=False, leave=0``: write a file beside the cache directory until
  the filesystem has ``leave`` bytes free; ``keep``: keep it so (another program
  that takes every byte hybridkv frees); ``unfill``: stop and delete it.
- ``sleep`` ``s``; ``mark`` ``path`` (create a file, for a watching test).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from hybridkv.store.format import FORMAT_VERSION, read_header
from hybridkv.testing.disk_fill import Filler, FreeSpaceWatch
from hybridkv.store.file_map import CHUNK_SUFFIX, TMP_SUFFIX

__all__ = ["FaultPlan", "chunk_files", "rewrite_header"]

_KINDS = {"full": "full_attention", "sliding": "sliding_window", "state": "state"}


def chunk_files(layout_dir: Path) -> list[Path]:
    """Visible chunk files of every rank (not quarantined ones, not temp files)."""
    return sorted(p for p in layout_dir.glob(f"r*/g*/*/*{CHUNK_SUFFIX}")
                  if not p.name.startswith("."))


def temp_files(layout_dir: Path) -> list[Path]:
    return sorted(p for p in layout_dir.glob(f"r*/**/.*{TMP_SUFFIX}"))


def rewrite_header(data: bytes, **fields: Any) -> bytes:
    """The same chunk file with header fields replaced (checksum untouched)."""
    (n,) = struct.unpack("<Q", data[:8])
    table = json.loads(data[8:8 + n])
    meta = json.loads(table["__metadata__"]["hybridkv"])
    meta.update(fields)
    table["__metadata__"]["hybridkv"] = json.dumps(meta)
    raw = json.dumps(table).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


class FaultPlan:
    def __init__(self, llm, cache_dir: str | None, faults_file: str | Path | None = None):
        self.llm = llm
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.faults_file = Path(faults_file) if faults_file else None
        self.pids: set[int] = set()
        self._refresh_pids()
        self.files: dict[str, list[str]] = {}
        self.events: list[dict[str, Any]] = []
        self._known: set[Path] = set(chunk_files(self.layout_dir)) if self.layout_dir else set()
        self._mounted = False
        self._watch: FreeSpaceWatch | None = None
        self._filler: Filler | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def layout_dir(self) -> Path | None:
        if self.cache_dir is None:
            return None
        dirs = [p.parent for p in self.cache_dir.glob("*/layout.json")]
        own = [d for d in dirs if any(self._is_own(f) for f in (d / "stats").glob("*.json"))]
        found = own or dirs
        return found[0] if found else None

    def _refresh_pids(self) -> None:
        try:
            import psutil

            self.pids |= {c.pid for c in psutil.Process().children(recursive=True)}
        except Exception:  # pragma: no cover - psutil ships with vLLM
            pass

    def _is_own(self, stats_file: Path) -> bool:
        stem = stats_file.stem
        pid = stem.rsplit("-", 1)[-1]
        return pid.isdigit() and int(pid) in self.pids

    def own_stats(self) -> dict[str, dict[str, int]]:
        """Sum of this engine's processes' counters (not other engines' on the same dir)."""
        self._refresh_pids()
        total: dict[str, dict[str, int]] = {}
        layout_dir = self.layout_dir
        if layout_dir is None:
            return total
        for path in (layout_dir / "stats").glob("*.json"):
            if not self._is_own(path):
                continue
            try:
                data = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            for scope, values in data.items():
                bucket = total.setdefault(scope, {})
                for name, value in values.items():
                    bucket[name] = bucket.get(name, 0) + int(value)
        return total

    def _groups(self) -> dict[int, str]:
        doc = json.loads((self.layout_dir / "layout.json").read_text())
        return {g["index"]: g["kind"] for g in doc["layout"]["groups"]}

    def pick(self, label: str, kind: str = "full", pick: str = "middle") -> list[Path]:
        layout_dir = self.layout_dir
        groups = self._groups()
        paths = [layout_dir / rel for rel in self.files[label]]
        if kind != "any":
            want = _KINDS[kind]
            paths = [p for p in paths if groups[int(p.parent.parent.name[1:])] == want]
        if not paths:
            raise RuntimeError(f"no {kind} chunk files under label {label!r}")
        paths.sort(key=lambda p: (int(p.parent.parent.name[1:]),
                                  read_header(p.read_bytes()[:65536]).position))
        if pick == "all":
            return paths
        index = {"first": 0, "middle": len(paths) // 2, "last": len(paths) - 1}[pick]
        return [paths[index]]

    def report(self) -> dict[str, Any]:
        return {"files": self.files, "events": self.events}

    def finish(self) -> dict[str, dict[str, int]]:
        if self._filler is not None:
            self._do_unfill()
        if self._watch is not None:
            self._watch.close()
        if self._mounted:
            self._remount("rw")
        return self.own_stats()

    # ------------------------------------------------------------------ actions
    def run(self, actions: list[dict[str, Any]]) -> None:
        for action in actions:
            op = action["op"]
            event = getattr(self, f"_do_{op}")(**{k: v for k, v in action.items() if k != "op"})
            self.events.append({"op": op, **(event or {})})

    def _do_sleep(self, s: float) -> None:
        time.sleep(s)

    def _do_mark(self, path: str) -> None:
        Path(path).write_text(str(os.getpid()))

    def _do_barrier(self, dir: str, n: int, timeout: float = 300.0) -> dict:
        d = Path(dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / str(os.getpid())).touch()
        deadline = time.monotonic() + timeout
        while len(list(d.iterdir())) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"barrier {dir}: fewer than {n} sessions arrived")
            time.sleep(0.05)
        return {"t": time.time()}

    def _do_settle(self, timeout: float = 30.0, quiet: float = 1.0) -> dict:
        started = time.monotonic()
        last, since = None, started
        while time.monotonic() - started < timeout:
            st = self.own_stats().get("all", {})
            layout_dir = self.layout_dir
            state = (st.get("chunks_written", 0) + st.get("store_failures", 0),
                     st.get("chunks_stored", 0) + st.get("stores_failed", 0),
                     len(chunk_files(layout_dir)) if layout_dir else 0)
            tmp = temp_files(layout_dir) if layout_dir else []
            now = time.monotonic()
            if state != last or state[0] != state[1] or tmp:
                last, since = state, now
            elif now - since >= quiet:
                return {"settled": True, "s": round(now - started, 2)}
            time.sleep(0.1)
        return {"settled": False, "s": round(time.monotonic() - started, 2)}

    def _do_disk_usage(self) -> dict:
        files = chunk_files(self.layout_dir) if self.layout_dir else []
        per_group: dict[str, int] = {}
        for p in files:
            per_group[p.parent.parent.name] = per_group.get(p.parent.parent.name, 0) + p.stat().st_size
        tmp = temp_files(self.layout_dir) if self.layout_dir else []
        return {"chunk_bytes": sum(per_group.values()), "chunk_files": len(files),
                "per_group": per_group, "temp_bytes": sum(p.stat().st_size for p in tmp)}

    def _do_free_space(self) -> dict:
        if self._watch is None:
            self._watch = FreeSpaceWatch(self.cache_dir)
        return self._watch.report()

    def _do_fill(self, keep: bool = False, leave: int = 0) -> dict:
        if self._watch is not None:
            self._watch.pause(True)
        self._filler = Filler(self.cache_dir.parent / "other-program.bin", keep=keep,
                              leave=leave)
        return {"filled": self._filler.written}

    def _do_unfill(self) -> dict:
        held = self._filler.stop()
        self._filler = None
        if self._watch is not None:
            self._watch.lowest = self._watch.report()["free"]  # a new phase starts
            self._watch.pause(False)
        return {"held": held}

    def _do_snapshot(self, label: str) -> dict:
        now = set(chunk_files(self.layout_dir)) if self.layout_dir else set()
        new = sorted(now - self._known)
        self._known = now
        self.files[label] = [str(p.relative_to(self.layout_dir)) for p in new]
        return {"label": label, "files": len(new)}

    def _do_reset_prefix_cache(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while not self.llm.reset_prefix_cache():
            if time.monotonic() > deadline:
                raise TimeoutError("reset_prefix_cache kept failing")
            time.sleep(0.1)
        return {}

    def _do_damage(self, label: str, how: str, kind: str = "full", pick: str = "middle") -> dict:
        paths = self.pick(label, kind, pick)
        for path in paths:
            if how == "delete":
                path.unlink()
                continue
            data = path.read_bytes()
            if how == "bitflip":
                data = bytearray(data)
                data[len(data) - len(data) // 4] ^= 0x01  # inside the payload
            elif how == "truncate":
                data = data[: len(data) - 1000]
            elif how == "other_layout":
                data = rewrite_header(data, fingerprint="00000000deadbeef")
            elif how == "future_version":
                data = rewrite_header(data, version=FORMAT_VERSION + 1)
            else:
                raise ValueError(f"unknown damage {how!r}")
            with open(path, "r+b") as f:  # in place, as a failing disk would
                f.write(bytes(data))
                f.truncate()
        return {"label": label, "how": how,
                "files": [str(p.relative_to(self.layout_dir)) for p in paths]}

    def _do_faults(self, rules: list[dict[str, Any]]) -> dict:
        if self.faults_file is None:
            raise RuntimeError("the 'faults' action needs the session's --faults-file")
        resolved = []
        for rule in rules:
            rule = dict(rule)
            target = rule.pop("target", None)
            if target is not None:
                rule["keys"] = [p.name[: -len(CHUNK_SUFFIX)] for p in self.pick(**target)]
            resolved.append(rule)
        tmp = self.faults_file.with_suffix(".writing")
        tmp.write_text(json.dumps({"rules": resolved}))
        os.replace(tmp, self.faults_file)
        return {"rules": resolved}

    def _do_remount(self, mode: str) -> dict:
        self._remount(mode)
        return {"mode": mode}

    def _remount(self, mode: str) -> None:
        path = str(self.cache_dir)
        if not self._mounted:
            subprocess.run(["mount", "--bind", path, path], check=True)
            self._mounted = True
        subprocess.run(["mount", "-o", f"remount,bind,{mode}", path], check=True)
