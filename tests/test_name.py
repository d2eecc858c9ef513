"""
A worker's name is the same wherever it shows: the C{name} command,
C{get_config}, the registration file and C{funcnodes worker list}.

Without a name of its own a worker goes by its uuid, as the reference's does
(checked side by side); a name from C{--name} or from the config wins, and
survives restarts. Real worker processes, and the real FuncNodes CLI.
"""

import json
import sys
import uuid as uuidlib
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, error, reactor

from test_process import (
    free_port,
    launcher_argv,
    spawn,  # noqa: F401  (the fixture)
    wait_ready,
    worker_argv,
    worker_files,
)
from workers import start_ours, start_reference
from wsclient import connect

pytestmark = pytest.mark.slow

FUNCNODES = Path(sys.executable).parent / "funcnodes"


@pytest.fixture(autouse=True)
def _clean(clean_reactor):
    yield


@defer.inlineCallbacks
def listed_names(spawn, config_dir):
    """
    C{funcnodes worker list}: the CLI prints one "uuid<TAB>name" per worker.
    """
    lister = spawn("funcnodes-worker-list", [str(FUNCNODES), "worker", "list"], config_dir)
    reason = yield lister.ended(timeout=60)
    assert isinstance(reason, error.ProcessDone), lister.tail()
    lines = bytes(lister.out).decode().splitlines()
    return dict(line.split("\t", 1) for line in lines if "\t" in line)


@defer.inlineCallbacks
def names(spawn, port, config_dir, worker_uuid):
    """
    The worker's name as each of the four places gives it.
    """
    client = yield connect(reactor, f"ws://127.0.0.1:{port}")
    try:
        answered = yield client.call("name")
        config = yield client.call("get_config")
    finally:
        yield client.close()
    registration = json.loads(worker_files(config_dir, worker_uuid)[0].read_text())
    listed = yield listed_names(spawn, config_dir)
    return {
        "name": answered,
        "get_config": config["name"],
        "json": registration["name"],
        "list": listed.get(worker_uuid),
    }


def everywhere(name):
    return dict.fromkeys(["name", "get_config", "json", "list"], name)


@pytest.mark.reference
@pytest_twisted.inlineCallbacks
def test_without_a_name_the_uuid_is_the_name_as_in_the_reference(tmp_path, spawn):
    for start in (start_ours, start_reference):
        worker = yield start(tmp_path)
        try:
            seen = yield names(spawn, worker.port, worker.config_dir, worker.uuid)
        finally:
            yield worker.stop()
        assert seen == everywhere(worker.uuid), worker.name


@pytest_twisted.inlineCallbacks
def test_a_given_name_wins_and_survives_restarts(tmp_path, spawn):
    config_dir, data_path = tmp_path / "config", tmp_path / "data"
    worker_uuid = f"n_{uuidlib.uuid4().hex[:12]}"
    port = free_port()

    @defer.inlineCallbacks
    def run(*options, rename=None):
        """
        Start the worker, read its name everywhere, rename it if asked, stop.
        """
        argv = worker_argv(launcher_argv(*options), port, data_path, worker_uuid)
        child = spawn("worker", argv, config_dir)
        yield wait_ready(child, port)
        seen = yield names(spawn, port, config_dir, worker_uuid)
        if rename is not None:
            client = yield connect(reactor, f"ws://127.0.0.1:{port}")
            yield client.call("update_worker_config", name=rename)
            yield client.close()
        child.transport.signalProcess("TERM")
        reason = yield child.ended()
        assert isinstance(reason, error.ProcessDone), child.tail()
        return seen

    assert (yield run("--name", "Lab one")) == everywhere("Lab one")
    assert (yield run(rename="  Renamed ")) == everywhere("Lab one"), "kept from the config"
    assert (yield run()) == everywhere("Renamed"), "the config's new name"
    assert (yield run("--name", "Lab two", rename="")) == everywhere("Lab two"), "--name wins"
    assert (yield run()) == everywhere(worker_uuid), "a blank name gives the uuid back"
