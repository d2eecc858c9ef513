"""The side-by-side table and the JSON results."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from typing import Any, Dict, List, Optional, TextIO

from bench.figures import Recorder, Row
from bench.harness import ROOT, SIDES, TITLES

HEADER = ["figure", TITLES["tw"], TITLES["ref"], "ratio (tw/ref)", "better", "target", "met"]
#: Columns right-aligned in the text table (the numbers).
RIGHT = {1, 2, 3}


def number(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if abs(round(value, 1)) >= 100:
        return f"{value:.0f}"
    if abs(round(value, 2)) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def met_text(row: Row) -> str:
    met = row.met
    if row.target is None:
        return ""
    return "-" if met is None else ("yes" if met else "no")


def cells(row: Row) -> List[str]:
    values = [f"{number(row.values.get(side))} {row.unit}" for side in SIDES]
    ratio = "-" if row.ratio is None else f"{row.ratio:.2f}"
    return [row.label, *values, ratio, row.better or "", row.target_text or "", met_text(row)]


def write_table(recorders: List[Recorder], stream: TextIO) -> None:
    """One table for all figures, a rule between figures; failed figures say why."""
    lines: List[Any] = [HEADER]
    for rec in recorders:
        lines.append(None)
        if rec.error:
            lines.append([f"{rec.name}: FAILED ({rec.error})"] + [""] * (len(HEADER) - 1))
        for row in rec.rows:
            lines.append(cells(row))
    widths = [max(len(line[i]) for line in lines if line) for i in range(len(HEADER))]
    rule = "-+-".join("-" * w for w in widths)
    for line in lines:
        if line is None:
            stream.write(rule + "\n")
            continue
        text = [
            cell.rjust(widths[i]) if i in RIGHT else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ]
        stream.write(" | ".join(text).rstrip() + "\n")
    stream.flush()


def write_markdown(recorders: List[Recorder], stream: TextIO) -> None:
    """The same table in Markdown, a bold line per figure (as docs/benchmarks.md has it)."""
    stream.write("| " + " | ".join(HEADER) + " |\n")
    aligns = ("---:" if i in RIGHT else "---" for i in range(len(HEADER)))
    stream.write("|" + "|".join(aligns) + "|\n")
    blank = " |" * (len(HEADER) - 1)
    for rec in recorders:
        title = f"**{rec.name}**" + (f" FAILED: {rec.error}" if rec.error else "")
        stream.write(f"| {title} |{blank}\n")
        for row in rec.rows:
            stream.write("| " + " | ".join(c.replace("|", "\\|") for c in cells(row)) + " |\n")
    stream.flush()


def machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["mem_total_mb"] = int(line.split()[1]) * 1024 // 1_000_000
                    break
    except OSError:
        pass
    try:
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def versions() -> Dict[str, Optional[str]]:
    found = {}
    for dist in ("funcnodes-tw", "funcnodes-worker", "funcnodes-core", "funcnodes-basic",
                 "twisted", "autobahn", "aiohttp"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


def git_state() -> Dict[str, Any]:
    """The commit funcnodes_tw was measured at, and its uncommitted files."""

    def git(*args):
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
        )
        return done.stdout.rstrip("\n") if done.returncode == 0 else None  # keep " M"

    try:
        commit = (git("rev-parse", "--short", "HEAD") or "").strip() or None
        status = git("status", "--porcelain", "--", "funcnodes_tw")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": []}
    return {"commit": commit, "dirty": [line[3:] for line in (status or "").splitlines()]}


def results_document(recorders: List[Recorder], config: Dict[str, Any], started: datetime.datetime):
    return {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
        "config": config,
        "sides": dict(TITLES),
        "figures": [rec.as_dict() for rec in recorders],
    }


def write_json(path: str, document: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(document, f, indent=1, default=str)
        f.write("\n")
