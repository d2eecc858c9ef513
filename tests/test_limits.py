"""
The worker's limits, each set on the command line and, separately, in the
worker config file (C{worker_<uuid>.json}, keys named like the Settings
fields): message size, upload size, client queue, large-message store,
connections and command timeout; and values that make no sense are a usage
error of the launcher (exit 2, no traceback).
"""

import json
import os
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.python import usage

from funcnodes_tw import persistence
from funcnodes_tw.protocol import CLOSE_TOO_SLOW
from funcnodes_tw.settings import MiB
from funcnodes_tw.tap import Options
from inprocess import (
    handshake,
    multipart,
    recorder,
    sleep,
    sleeper,
    start,  # noqa: F401  (fixture)
    texts,
    ws_connect,
)
from wsclient import CommandError

SOURCES = ["cli", "config"]


def limited(start, source, **limits):
    """
    A worker with C{limits} (Settings field names) given as options or in
    its config file.
    """
    if source == "cli":
        args = []
        for name, value in limits.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        return start(*args)
    return start(config=limits)


@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_max_incoming_size(start, monkeypatch, source):
    calls = recorder(monkeypatch)
    worker = yield limited(start, source, max_incoming_size=4096)
    assert worker.settings.max_incoming_size == 4096
    assert worker.settings.max_message_size == MiB  # replies' threshold: its own setting
    other = yield worker.connect()
    client = yield worker.connect()
    assert (yield client.call("test_record", value="y" * 3900, quiet=True)) is None
    client.send_json({"type": "cmd", "cmd": "test_record", "kwargs": {"value": "z" * 4100}})
    yield client.when_closed()
    assert client.close_code == 1009
    assert calls == ["y" * 3900], "the oversized message ran"
    assert (yield other.call("uuid")) == worker.uuid


@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_max_upload_size(start, monkeypatch, source):
    calls = recorder(monkeypatch)
    worker = yield limited(start, source, max_upload_size=2000)
    assert worker.settings.max_upload_size == 2000

    body, content_type = multipart("small.bin", b"s" * 1000)
    response = yield worker.http.post(
        worker.url("/upload/"), data=body, headers={"Content-Type": content_type}
    )
    assert (response.code, json.loads((yield response.content()))) == (200, {"file": "small.bin"})

    body, content_type = multipart("big.bin", b"b" * 2500)
    response = yield worker.http.post(
        worker.url("/upload/"), data=body, headers={"Content-Type": content_type}
    )
    assert (response.code, (yield response.content())) == (413, b"Upload too large")
    assert not worker.files.joinpath("big.bin").exists()

    message = {"type": "cmd", "cmd": "test_record", "kwargs": {"value": "v" * 2500}}
    response = yield worker.http.post(
        worker.url("/message/"),
        data=json.dumps(message).encode(),
        headers={"Content-Type": "application/json"},
    )
    assert (response.code, (yield response.content())) == (413, b"Message too large")
    assert calls == []


@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_max_client_queue(start, monkeypatch, source):
    """
    A client that stops reading is cut off once more than max_client_queue
    bytes wait for it; a client that reads gets every broadcast.
    """
    texts(monkeypatch)
    limit = 64 * 1024
    worker = yield limited(start, source, max_client_queue=limit)
    assert worker.settings.max_client_queue == limit
    fast = yield worker.connect()
    slow = yield worker.connect()
    slow_port = slow._proto.transport.getHost().port
    hub = worker.service.hub
    (server,) = [p for p in hub.clients if p.transport.getPeer().port == slow_port]
    slow._proto.transport.pauseProducing()

    size, peak, sent = 200_000, 0, 0
    body = json.dumps({"type": "cmd", "cmd": "test_text", "kwargs": {"size": size}}).encode()
    while not server.outbox.overflowed and sent < 300:  # up to 60 MB of broadcast results
        response = yield worker.http.post(
            worker.url("/message/"), data=body, headers={"Content-Type": "application/json"}
        )
        yield response.content()
        sent += 1
        peak = max(peak, server.outbox.size)
    assert server.outbox.overflowed, f"not cut off after {sent} broadcasts"
    assert server not in hub.clients
    assert peak <= limit + size + 100, f"at most one message beyond the bound waited ({peak})"
    assert (yield fast.call("uuid")) == worker.uuid
    results = [m for m in fast.transcript if m.get("type") == "result" and m.get("id") is None]
    assert len(results) == sent, "the client that reads got every broadcast"

    slow._proto.transport.resumeProducing()
    yield slow.when_closed()
    assert slow.close_code == CLOSE_TOO_SLOW


@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_max_message_store(start, monkeypatch, source):
    texts(monkeypatch)
    bound = 10_000
    worker = yield limited(start, source, max_message_size=1024, max_message_store=bound)
    assert worker.settings.max_message_store == bound
    store = worker.store
    assert store.max_bytes == bound
    client = yield worker.connect()
    hints = []
    for i in range(8):
        start_at = len(client.transcript)
        client.send_json({"type": "cmd", "cmd": "test_text", "kwargs": {"size": 3000}, "id": i})
        hint = yield client.wait_for(lambda m: m.get("type") == "large_message", start=start_at)
        hints.append(hint)
        assert store.size <= bound, f"{store.size} bytes parked after {i + 1} messages"
    assert len(store._entries) == 3  # three of ~3030 bytes fit in 10 000
    codes = []
    for hint in hints:
        response = yield worker.http.get(hint["url"])
        body = yield response.content()
        codes.append(response.code)
        if response.code == 200:
            assert json.loads(body)["result"] == "x" * 3000
    assert codes == [404] * 5 + [200] * 3, "the oldest went first"


@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_max_connections(start, source):
    worker = yield limited(start, source, max_connections=2)
    assert worker.service.factory.max_connections == 2
    first = yield worker.connect()
    second = yield worker.connect(listening=False)

    status, headers = yield handshake(worker)
    assert status == 503
    with pytest.raises(ConnectionError):
        yield ws_connect(worker)
    assert len(worker.service.hub.clients) == 2
    assert (yield first.call("uuid")) == worker.uuid
    assert (yield second.call("uuid")) == worker.uuid

    # A closed connection frees its place.
    yield second.close()
    for _ in range(100):
        if len(worker.service.hub.clients) < 2:
            break
        yield sleep(0.02)
    third = yield worker.connect()
    assert (yield third.call("uuid")) == worker.uuid
    assert (yield first.call("uuid")) == worker.uuid


@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_command_timeout(start, monkeypatch, source):
    calls = sleeper(monkeypatch)
    worker = yield limited(start, source, command_timeout=0.5)
    assert worker.settings.command_timeout == 0.5
    client = yield worker.connect()
    began = time.monotonic()
    slow = client.call("test_sleep", seconds=30, msg_id="slow")
    after = client.call("uuid", msg_id="after")  # queued behind the slow one
    with pytest.raises(CommandError) as failed:
        yield slow
    assert "did not finish within 0.5 s" in failed.value.error
    assert failed.value.error == "Command 'test_sleep' did not finish within 0.5 s"
    assert (yield after) == worker.uuid
    assert time.monotonic() - began < 5
    assert calls == ["cancelled"], "the timed-out command was not cancelled"
    replies = [m.get("id") for m in client.transcript if m.get("type") in ("result", "error")]
    assert replies[-2:] == ["slow", "after"]
    # Quick commands still finish, on the same connection.
    assert (yield client.call("test_sleep", seconds=0.05)) == 0.05
    assert calls == ["cancelled", "done"]


# region invalid values


BAD_CONFIGS = [
    ({"max_message_size": 0}, "max_message_size must be a positive number"),
    ({"max_message_size": -5}, "max_message_size must be a positive number"),
    ({"max_message_size": 0.5}, "max_message_size must be a whole number"),
    ({"max_incoming_size": "16MB"}, "max_incoming_size must be a positive number"),
    ({"max_upload_size": "10MB"}, "max_upload_size must be a positive number"),
    ({"max_client_queue": True}, "max_client_queue must be a positive number"),
    ({"max_message_store": [1]}, "max_message_store must be a positive number"),
    ({"max_connections": 1.5}, "max_connections must be a whole number"),
    ({"command_timeout": "soon"}, "command_timeout must be a positive number"),
    ({"command_timeout": -1}, "command_timeout must be a positive number"),
    ({"required_heartbeat": 0}, "required_heartbeat must be a positive number"),
    ({"token": 12345}, "token must be"),
    ({"token": ""}, "token must be"),
    ({"token": "a/b"}, "token must be"),
    ({"allowed_origins": "http://x"}, "allowed_origins must be a list"),
    ({"log_level": "loud"}, "log_level must be one of"),
    ({"debug": "false"}, "debug must be true or false"),
]
BAD_ARGS = [
    (["--max-message-size", "0"], "must be positive"),
    (["--max-upload-size", "1.5"], "invalid literal for int()"),
    (["--max-client-queue", "-1"], "must be positive"),
    (["--max-message-store", "lots"], "invalid literal for int()"),
    (["--max-connections", "0"], "must be positive"),
    (["--command-timeout", "nan"], "must be positive"),
    (["--command-timeout", "inf"], "must be positive"),
    (["--token", ""], "token must be"),
    (["--log-level", "loud"], "--log-level must be one of"),
]


def _write_config(tmp_path, uuid, config):
    path = tmp_path / "config" / "workers" / f"worker_{uuid}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))
    return path


def _ids(cases):
    return [" ".join(c[0]) if isinstance(c[0], list) else json.dumps(c[0]) for c in cases]


@pytest.mark.parametrize("config, message", BAD_CONFIGS, ids=_ids(BAD_CONFIGS))
def test_invalid_config_values_are_usage_errors(tmp_path, monkeypatch, config, message):
    monkeypatch.setattr(persistence, "workers_dir", lambda: tmp_path / "config" / "workers")
    path = _write_config(tmp_path, "bad", config)
    with pytest.raises(usage.UsageError) as error:
        Options().parseOptions(["--uuid", "bad", "--data-path", str(tmp_path / "data")])
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


@pytest.mark.parametrize("args, message", BAD_ARGS, ids=_ids(BAD_ARGS))
def test_invalid_options_are_usage_errors(tmp_path, monkeypatch, args, message):
    monkeypatch.setattr(persistence, "workers_dir", lambda: tmp_path / "config" / "workers")
    with pytest.raises(usage.UsageError) as error:
        Options().parseOptions(["--uuid", "bad", "--data-path", str(tmp_path / "data"), *args])
    assert message in str(error.value)


@pytest.mark.parametrize(
    "config, args",
    [({"max_connections": 0.5}, []), ({"token": "a b"}, []), ({}, ["--command-timeout", "0"])],
    ids=["config-number", "config-token", "option"],
)
def test_the_launcher_exits_2_without_a_traceback(tmp_path, config, args):
    _write_config(tmp_path, "bad", config)
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(tmp_path / "config"))
    command = [sys.executable, "-m", "funcnodes_tw", "--uuid", "bad", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("funcnodes-tw: "), done.stderr
    assert not (tmp_path / "config" / "workers" / "worker_bad.p").exists(), "it started"


# endregion
