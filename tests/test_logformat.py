"""
C{--log-format json}: one JSON object a line (Twisted's own event form) on
the launcher's stdout and in C{worker.log}; the default stays text.
"""

import io
import json

import pytest_twisted
from twisted.logger import Logger, eventFromJSON, formatEvent

from funcnodes_tw import logs
from workers import start_ours, start_worker


def json_lines(text):
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    return [eventFromJSON(line) for line in lines]


@pytest_twisted.inlineCallbacks
def test_the_launcher_logs_json_to_stdout_and_worker_log(tmp_path):
    worker = yield start_worker("json", ["-m", "funcnodes_tw", "--log-format", "json"], tmp_path)
    yield worker.stop()
    stdout = json_lines(worker.stdout_path.read_text())
    texts = [formatEvent(event) for event in stdout]
    line = f"Worker {worker.uuid} listening on ws://127.0.0.1:{worker.port}"
    assert line in texts and f"Worker {worker.uuid} stopped" in texts
    listening = stdout[texts.index(line)]
    assert listening["uuid"] == worker.uuid and listening["log_level"].name == "info"
    in_file = json_lines((worker.data_path / "worker.log").read_text())
    assert f"Worker {worker.uuid} stopped" in [formatEvent(event) for event in in_file]


@pytest_twisted.inlineCallbacks
def test_text_stays_the_default(tmp_path):
    worker = yield start_ours(tmp_path, name="text")
    yield worker.stop()
    stdout = worker.stdout_path.read_text()
    assert f"Worker {worker.uuid} listening on ws://127.0.0.1:{worker.port}" in stdout
    assert not stdout.lstrip().startswith("{")


def test_a_bad_log_format_is_refused(tmp_path, capsys):
    from funcnodes_tw import launcher

    assert launcher.main(["--log-format", "xml", "--data-path", str(tmp_path)]) == 2
    assert "--log-format must be one of text, json" in capsys.readouterr().err


def test_twistd_takes_the_json_observer_as_its_logger(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    observer = logs.json_stdout()
    Logger(observer=observer).warn("disk {percent}% full", percent=97)
    (event,) = json_lines(out.getvalue())
    assert formatEvent(event) == "disk 97% full" and event["percent"] == 97
