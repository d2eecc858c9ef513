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

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^-?\d+(\.\d+)?(\s+\S+)?$")  # "123 MB/s", "0.21 ms", "1.00"
TARGET = re.compile(r"^[<>]= \d+(\.\d+)?(x| \S+)$")  # ">= 1.5x", "<= 20 MB"


def _bench(*args, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.reference
def test_quick_run_prints_every_figure_for_both_workers(tmp_path):
    listed = _bench("--list", timeout=60)
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]
    assert {"upload", "large", "rpc", "pipeline", "chain", "chain0", "full_state", "idle"} <= set(
        names
    )

    results = tmp_path / "bench.json"
    run = _bench("--quick", "--json", str(results))
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]

    document = json.loads(results.read_text())
    assert [fig["name"] for fig in document["figures"]] == names
    table = {}
    for line in run.stdout.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) == 7:
            table[cells[0]] = cells
    assert table.get("figure") == [
        "figure", "funcnodes_tw", "reference", "ratio (tw/ref)", "better", "target", "met"
    ]

    for fig in document["figures"]:
        assert fig["error"] is None, fig
        assert fig["rows"], f"no rows for figure {fig['name']}"
        for row in fig["rows"]:
            assert isinstance(row["tw"], (int, float)), row
            assert isinstance(row["ref"], (int, float)), row
            cells = table.get(row["label"])
            assert cells is not None, f"{row['label']!r} not in the table:\n{run.stdout}"
            assert NUMBER.match(cells[1]) and NUMBER.match(cells[2]), cells
            # A goal shows as e.g. ">= 1.5x" or "<= 20 MB" with "yes"/"no" beside it.
            if row["target"] is None:
                assert cells[5:] == ["", ""], cells
            else:
                assert cells[5] == row["target"] and TARGET.match(cells[5]), cells
                assert cells[6] == {True: "yes", False: "no", None: "-"}[row["met"]], cells
    targets = [row["target"] for fig in document["figures"] for row in fig["rows"]]
    assert sum(t is not None for t in targets) >= 10, targets


def test_targets_and_markdown_table():
    """The target/met columns, without starting any worker."""
    import io

    from bench.figures import Recorder, ratio_at_least, ratio_at_most, tw_at_most
    from bench.report import write_markdown, write_table

    rec = Recorder("demo", "demo figure")
    rec.add("calls", "1/s", {"tw": 300.0, "ref": 100.0}, "higher", target=ratio_at_least(1.5))
    rec.add("latency", "ms", {"tw": 2.0, "ref": 2.0}, "lower", target=ratio_at_most(0.7))
    rec.add("growth", "MB", {"tw": 25.0, "ref": 0.1}, "lower", target=tw_at_most(20))
    rec.add("rss", "MB", {"tw": 100.0, "ref": 70.0})
    assert [row.met for row in rec.rows] == [True, False, False, None]
    assert [row.target_text for row in rec.rows] == [">= 1.5x", "<= 0.7x", "<= 20 MB", None]
    assert rec.as_dict()["rows"][0]["met"] is True

    text = io.StringIO()
    write_table([rec], text)
    lines = {line.split("|")[0].strip(): [c.strip() for c in line.split("|")]
             for line in text.getvalue().splitlines() if "|" in line}
    assert lines["calls"][5:] == [">= 1.5x", "yes"]
    assert lines["latency"][5:] == ["<= 0.7x", "no"]
    assert lines["growth"][3:] == ["-", "lower", "<= 20 MB", "no"]  # no ratio under 1 MB
    assert lines["rss"][5:] == ["", ""]

    md = io.StringIO()
    write_markdown([rec], md)
    rows = md.getvalue().splitlines()
    assert rows[0].startswith("| figure |") and rows[0].endswith("| target | met |")
    assert rows[2].startswith("| **demo** |")
    assert "| calls | 300 1/s | 100 1/s | 3.00 | higher | >= 1.5x | yes |" in rows
