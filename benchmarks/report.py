"""What every benchmark prints and saves: target lines and one JSON document.

A target is ``{"figure", "goal", "met", ...}``; its line reads
``target NAME: FIGURE (goal GOAL) MET|MISSED`` plus an optional note.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def print_targets(targets: dict[str, dict], note: str = "") -> None:
    for name, t in targets.items():
        extra = f" (worst: {t['worst_cell']})" if "worst_cell" in t else ""
        print(f"target {name}: {t['figure']} (goal {t['goal']}) "
              f"{'MET' if t['met'] else 'MISSED'}{extra}{note}")


def save(out: Path, benchmark: str, *, quick: bool, started: float, **sections) -> dict:
    """Write the benchmark's JSON (machine, command, sections, wall time) and say where."""
    doc = {"benchmark": benchmark, "quick": quick, "command": sys.argv,
           "machine": {"platform": platform.platform(), "python": platform.python_version(),
                       "cpus": os.cpu_count()},
           **sections, "wall_s": time.perf_counter() - started}
    out.write_text(json.dumps(doc, indent=1))
    print(f"saved {out} ({doc['wall_s']:.1f} s)")
    return doc
