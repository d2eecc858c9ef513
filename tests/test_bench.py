"""Smoke test of the benchmark: ``python -m bench --quick`` against both workers.

Runs the real CLI as a subprocess (it starts funcnodes_tw and the reference worker
itself) and checks that the table has a row with numbers for both workers for every
figure, and that the JSON results agree.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.reference]

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^-?\d+(\.\d+)?\s+\S+$")  # "123 MB/s", "0.21 ms"


def _bench(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


def test_quick_run_prints_every_figure_for_both_workers(tmp_path):
    listed = _bench("--list", timeout=60)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert {"upload", "large", "rpc"} <= set(names)

    results = tmp_path / "bench.json"
    run = _bench("--quick", "--json", str(results))
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]

    document = json.loads(results.read_text())
    assert [fig["name"] for fig in document["figures"]] == names
    table = {}
    for line in run.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) == 5:
            table[cells[0]] = cells
    assert table.get("figure", [None])[1:3] == ["funcnodes_tw", "reference"]

    for fig in document["figures"]:
        assert fig["error"] is None, fig
        assert fig["rows"], f"no rows for figure {fig['name']}"
        for row in fig["rows"]:
            assert isinstance(row["tw"], (int, float)), row
            assert isinstance(row["ref"], (int, float)), row
            cells = table.get(row["label"])
            assert cells is not None, f"{row['label']!r} not in the table:\n{run.stdout}"
            assert NUMBER.match(cells[1]) and NUMBER.match(cells[2]), cells
