"""
Load: 50 WebSocket clients x 2 000 pipelined commands against one worker
subprocess, with value previews and trigger events broadcast to all of them
(L{bench.load} does the work: the worker, client processes, the checks).

Every command must be answered exactly once, every client must see the same
events and the final value of every node, and the worker's memory must stay
bounded. The size comes from C{FUNCNODES_TW_LOAD_CLIENTS} and
C{FUNCNODES_TW_LOAD_COMMANDS} (commands per client); the full size takes
about 20 s on the 2-core test machine.

Also a smoke run of the soak script (C{python -m bench.soak --quick}).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = int(os.environ.get("FUNCNODES_TW_LOAD_CLIENTS", 50))
COMMANDS = int(os.environ.get("FUNCNODES_TW_LOAD_COMMANDS", 2000))
#: A generous bound: the growth seen is a few MB.
MAX_RSS_GROWTH_MB = 300


def test_many_clients_many_commands(tmp_path):
    report_file = tmp_path / "load.json"
    run = subprocess.run(
        [
            sys.executable, "-m", "bench.load",
            "--clients", str(CLIENTS), "--commands", str(COMMANDS),
            "--json", str(report_file),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert report_file.exists(), run.stdout + run.stderr[-4000:]
    report = json.loads(report_file.read_text())
    print("\nFIGURES load\n" + run.stdout)
    assert report["problems"] == [], run.stdout
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]

    totals = report["totals"]
    expected = CLIENTS * COMMANDS
    assert totals["sent"] == totals["answered"] == expected
    assert totals["missing"] == totals["duplicates"] == totals["unknown"] == 0
    assert totals["errors"] == totals["wrong_results"] == 0
    assert totals["pongs"] == totals["pings"] > 0
    assert report["lost_events"] == 0
    assert report["wrong_final_values"] == 0
    # Events really flowed to everyone: triggers of every setter's pair.
    events = report["events"]
    assert events["node_added"] == {"min": 1, "max": 1}
    assert sum(v["min"] for k, v in events.items() if k.startswith("trigger")) > 0
    assert report["io_value_frames"]["min"] > 0
    assert report["rss_peak_mb"] - report["rss_before_mb"] < MAX_RSS_GROWTH_MB
    assert report["worker_exit_code"] == 0
    assert report["worker_log_problems"] == []


def test_soak_quick(tmp_path):
    report_file = tmp_path / "soak.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--quick", "--json", str(report_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert len(report["rss_series_mb"]) >= 10
    stats = report["stats"]
    assert stats["commands"] > 100 and stats["connections"] > 5
    assert stats.get("errors", 0) == stats.get("timeouts", 0) == 0
    assert report["worker_exit_code"] == 0
