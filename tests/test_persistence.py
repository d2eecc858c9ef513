"""
Files on disk: atomic writes, corrupt state kept aside, the C{.p} process file.

A user's graph must survive crashes and hand-edits, and a stale C{.p} left by
a crash must not block the next start (the reference refuses to start).
"""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from funcnodes_tw import persistence
from funcnodes_tw.service import AlreadyRunning, claim_process_file


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# region atomic writes


def test_write_atomic_keeps_the_previous_version(tmp_path):
    path = tmp_path / "nodespace.json"
    persistence.write_atomic(path, b"first")
    assert path.read_bytes() == b"first"
    assert not (tmp_path / "nodespace.json.bu").exists()
    persistence.write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert (tmp_path / "nodespace.json.bu").read_bytes() == b"first"
    persistence.write_atomic(path, b"third")
    assert (tmp_path / "nodespace.json.bu").read_bytes() == b"second"


def test_write_atomic_leaves_no_temp_files_and_is_private(tmp_path):
    path = tmp_path / "sub" / "state.json"
    for n in range(3):
        persistence.write_atomic(path, b"x" * n)
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json", "state.json.bu"]
    assert mode(path) == 0o600


def test_write_atomic_without_backup(tmp_path):
    path = tmp_path / "worker_x.p"
    persistence.write_text(path, "123")
    persistence.write_text(path, "456")
    assert path.read_text() == "456"
    assert [p.name for p in tmp_path.iterdir()] == ["worker_x.p"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "nodespace.json"
    persistence.write_atomic(path, b"good")

    def broken_fsync(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(persistence.os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        persistence.write_atomic(path, b"bad")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["nodespace.json"]


def test_write_config_is_indented_json(tmp_path):
    path = tmp_path / "worker_u.json"
    persistence.write_config(path, {"type": "WSWorker", "port": 9382})
    assert json.loads(path.read_text()) == {"type": "WSWorker", "port": 9382}
    assert "\n  " in path.read_text()
    assert mode(path) == 0o600


# endregion
# region loading state


def test_load_state_missing_file_is_none(tmp_path):
    assert persistence.load_state(tmp_path / "nodespace.json") is None


def test_load_state_reads_a_state(tmp_path):
    path = tmp_path / "nodespace.json"
    state = {"backend": {"nodes": [], "edges": [], "prop": {}}, "view": {}, "meta": {}}
    persistence.write_json(path, state)
    assert persistence.load_state(path) == state


@pytest.mark.parametrize(
    "content", [b"{broken", b"\xff\xfe\x00", b"[1, 2]", b'{"backend": [1]}', b"null"]
)
def test_corrupt_state_is_moved_aside(tmp_path, content):
    path = tmp_path / "nodespace.json"
    path.write_bytes(content)
    with pytest.raises(persistence.StateFileError) as info:
        persistence.load_state(path)
    assert not path.exists()
    assert (tmp_path / "nodespace.json.corrupt-0").read_bytes() == content
    assert "nodespace.json.corrupt-0" in str(info.value)


def test_corrupt_copies_are_numbered_not_overwritten(tmp_path):
    path = tmp_path / "nodespace.json"
    for n in range(3):
        path.write_bytes(b"bad %d" % n)
        with pytest.raises(persistence.StateFileError):
            persistence.load_state(path)
    for n in range(3):
        assert (tmp_path / f"nodespace.json.corrupt-{n}").read_bytes() == b"bad %d" % n


# endregion
# region process file


@pytest.fixture
def sleeper():
    """
    A live process whose command line mentions funcnodes, like a worker's.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)  # funcnodes"]
    )
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_claim_writes_our_pid(tmp_path):
    path = tmp_path / "worker_u.p"
    claim_process_file(path)
    assert path.read_text() == str(os.getpid())


def test_claim_ignores_a_stale_file(tmp_path):
    path = tmp_path / "worker_u.p"
    path.write_text(str(dead_pid()))
    claim_process_file(path)
    assert path.read_text() == str(os.getpid())


@pytest.mark.parametrize("content", ["", "garbage", '{"type":"cmd","cmd":"stop_worker"}'])
def test_claim_ignores_content_that_is_no_pid(tmp_path, content):
    path = tmp_path / "worker_u.p"
    path.write_text(content)
    claim_process_file(path)
    assert path.read_text() == str(os.getpid())


def test_claim_refuses_a_live_worker(tmp_path, sleeper):
    path = tmp_path / "worker_u.p"
    path.write_text(str(sleeper.pid))
    # The child may not have exec'd python yet: its cmdline is briefly empty.
    deadline = time.monotonic() + 5
    while b"funcnodes" not in open(f"/proc/{sleeper.pid}/cmdline", "rb").read():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(AlreadyRunning, match=str(sleeper.pid)):
        claim_process_file(path)
    assert path.read_text() == str(sleeper.pid)


def test_claim_ignores_a_live_process_that_is_no_worker(tmp_path):
    """
    A recycled pid (some other program) does not block the start.
    """
    child = subprocess.Popen(["sleep", "30"])
    try:
        path = tmp_path / "worker_u.p"
        path.write_text(str(child.pid))
        claim_process_file(path)
        assert path.read_text() == str(os.getpid())
    finally:
        child.kill()
        child.wait()


# endregion
