"""
The HTTP side of the worker, over real sockets: C{treq} and Autobahn clients
against a worker service listening on 127.0.0.1 in this process.

Covered: large messages (C{GET /message/<id>}, expiry, spilling to disk,
C{POST /message/}), uploads (C{POST /upload/} and the C{upload} command:
folders, traversal, symlinks, size limits, overwrite), CORS and the WebSocket
origin check, chunked binary results, and export/import (also with the
reference worker, marked C{reference}).
"""

import base64
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

import wsclient
from funcnodes_tw import resources, wire
from inprocess import sleep, start, ws_connect  # noqa: F401 (fixture)
from wsclient import CommandError

#: A small frame limit, so that large messages stay small (tests that need it).
MAX_MESSAGE = 4096
SMALL_FRAMES = ("--max-message-size", str(MAX_MESSAGE))
MAX_UPLOAD = 64 * 1024
UPLOAD_LIMIT = ("--max-upload-size", str(MAX_UPLOAD))
BINARY_FRAME = 256
LOOPBACK_ORIGIN = "http://localhost:5173"
EVIL_ORIGIN = "http://evil.example"


# region helpers


def multipart(parts, boundary=b"fnboundary7MA4YWxkTrZu0gW"):
    """
    A multipart/form-data body built by hand, so that names clients would
    refuse (NUL bytes, backslashes) can be sent. C{parts}: (field, filename
    bytes or None, content bytes).
    """
    body = b""
    for field, filename, content in parts:
        disposition = b'form-data; name="' + field.encode() + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        body += b"--" + boundary + b"\r\n"
        body += b"Content-Disposition: " + disposition + b"\r\n"
        body += b"Content-Type: application/octet-stream\r\n\r\n"
        body += content + b"\r\n"
    body += b"--" + boundary + b"--\r\n"
    return body, "multipart/form-data; boundary=" + boundary.decode()


VOLATILE = ("workers", "nodespace.json", "nodespace.json.bu")


def snapshot(root):
    """
    Every path under C{root} (links not followed) with the content of files,
    leaving out what the worker writes on its own (registration, state, log).
    """
    found = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in VOLATILE]
        for name in dirs + names:
            if name in VOLATILE or name.startswith("worker.log"):
                continue
            path = Path(folder, name)
            content = None
            if path.is_file() and not path.is_symlink():
                content = path.read_bytes()
            found[path.relative_to(root).as_posix()] = content
    return found


@defer.inlineCallbacks
def upload(worker, parts, headers=None):
    body, content_type = multipart(parts)
    response = yield worker.http.post(
        worker.url("/upload/"), data=body, headers={"content-type": content_type, **(headers or {})}
    )
    text = yield response.content()
    return response, text


@implementer(IBodyProducer)
class ChunkedBody:
    """
    A body of unknown length: the Agent sends it with chunked encoding.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, data, size=8192):
        self.data = data
        self.size = size

    def startProducing(self, consumer):
        for i in range(0, len(self.data), self.size):
            consumer.write(self.data[i : i + self.size])
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def header(response, name):
    return response.headers.getRawHeaders(name)


def is_large(message):
    return isinstance(message, dict) and message.get("type") == "large_message"


@defer.inlineCallbacks
def fetch(worker, msgid, **kw):
    response = yield worker.http.get(worker.url(f"/message/{msgid}"), **kw)
    body = yield response.content()
    return response, body


@defer.inlineCallbacks
def add_upper(client, **kwargs):
    node = yield client.call("add_node", id="string.upper", **kwargs)
    return node["id"]


# endregion
# region large messages


@pytest_twisted.inlineCallbacks
def test_large_result_is_parked_and_served_exactly(start):
    worker = yield start(*SMALL_FRAMES)
    client = yield worker.connect()
    nid = yield add_upper(client)
    value = "".join(chr(ord("a") + i % 26) for i in range(3000))
    # Small enough to come back in the frame...
    assert (yield client.call("set_io_value", nid=nid, ioid="s", value=value)) == value
    assert not any(is_large(m) for m in client.transcript)
    # ...but as base64 the full value is over the threshold.
    start_at = len(client.transcript)
    client.send_json(
        {"type": "cmd", "cmd": "get_io_full_value", "kwargs": {"nid": nid, "ioid": "s"},
         "id": "big-1", "as_bytes": False}
    )
    hint = yield client.wait_for(is_large, start=start_at)
    assert set(hint) == {"type", "url", "msg_id"}
    assert hint["url"] == worker.url(f"/message/{hint['msg_id']}")

    response, body = yield fetch(worker, hint["msg_id"])
    assert response.code == 200
    assert header(response, b"content-type") == [b"application/json; charset=utf-8"]
    assert response.length == len(body)  # Content-Length (Agent keeps it out of .headers)
    assert len(body) * 1.1 > MAX_MESSAGE
    message = json.loads(body)
    assert message["type"] == "result" and message["id"] == "big-1"
    assert base64.b64decode(message["result"]["data"]).decode() == value
    assert message["result"]["mime"] == "text/plain"

    # The fetch shortened the entry's life to the grace period, not to zero.
    again, body_again = yield fetch(worker, hint["msg_id"])
    assert again.code == 200 and body_again == body
    assert (yield client.call("uuid")) == "http_w"


@pytest_twisted.inlineCallbacks
def test_large_event_is_parked(start):
    worker = yield start(*SMALL_FRAMES)
    client = yield worker.connect()
    start_at = len(client.transcript)
    # node_added carries the whole node (its name included): over the threshold.
    name = "N" * 2500
    client.send_json(
        {"type": "cmd", "cmd": "add_node", "kwargs": {"id": "string.upper", "name": name},
         "id": "add-1"}
    )
    yield client.wait_for(lambda m: m.get("id") == "add-1" or is_large(m), start=start_at)
    yield client.wait_quiet(0.3)
    hints = [m for m in client.transcript[start_at:] if is_large(m)]
    fetched = []
    for hint in hints:
        response, body = yield fetch(worker, hint["msg_id"])
        assert response.code == 200
        fetched.append(json.loads(body))
    events = [m for m in fetched if m["type"] == "nsevent" and m["event"] == "node_added"]
    assert len(events) == 1
    assert events[0]["data"]["node"]["name"] == name
    results = [m for m in fetched if m["type"] == "result"]
    assert [r["id"] for r in results] == ["add-1"]
    assert results[0]["result"]["id"] == events[0]["data"]["node"]["id"]


@defer.inlineCallbacks
def make_large(worker, client, msgid="big"):
    """
    Send a command whose result is a large message; return its hint.
    """
    if not hasattr(worker, "nid"):
        worker.nid = yield add_upper(client)
        yield client.call("set_io_value", nid=worker.nid, ioid="s", value="q" * 3000)
    start_at = len(client.transcript)
    client.send_json(
        {"type": "cmd", "cmd": "get_io_full_value",
         "kwargs": {"nid": worker.nid, "ioid": "s"}, "id": msgid}
    )
    hint = yield client.wait_for(is_large, start=start_at)
    return hint


@pytest_twisted.inlineCallbacks
def test_expired_and_unknown_messages_are_404(start):
    worker = yield start(*SMALL_FRAMES)
    # Startup broadcasts (the library is far over 4 KB) reached nobody: not parked.
    assert worker.store.size == 0
    client = yield worker.connect()

    response, body = yield fetch(worker, "0f0e6e4a-0000-4000-8000-000000000000")
    assert (response.code, body) == (404, b"Message not found")
    response, body = yield fetch(worker, "")
    assert (response.code, body) == (404, b"Message not found")

    worker.store.ttl = 0.3
    hint = yield make_large(worker, client, "ttl")
    yield sleep(0.5)
    response, body = yield fetch(worker, hint["msg_id"])
    assert (response.code, body) == (404, b"Message not found")

    # After a fetch, only the grace period is left.
    worker.store.ttl = 60
    worker.store.grace = 0.3
    hint = yield make_large(worker, client, "grace")
    first, _ = yield fetch(worker, hint["msg_id"])
    assert first.code == 200
    yield sleep(0.5)
    response, body = yield fetch(worker, hint["msg_id"])
    assert (response.code, body) == (404, b"Message not found")
    worker.store.expire()
    assert worker.store.size == 0


@pytest_twisted.inlineCallbacks
def test_concurrent_fetches_get_the_same_bytes(start):
    worker = yield start(*SMALL_FRAMES)
    client = yield worker.connect()
    hint = yield make_large(worker, client, "many")
    replies = yield defer.gatherResults([fetch(worker, hint["msg_id"]) for _ in range(10)])
    assert [r.code for r, _ in replies] == [200] * 10
    bodies = {body for _, body in replies}
    assert len(bodies) == 1
    assert json.loads(bodies.pop())["id"] == "many"


@pytest_twisted.inlineCallbacks
def test_spilled_entry_is_served_from_its_file(start, tmp_path):
    worker = yield start(*SMALL_FRAMES)
    client = yield worker.connect()
    spill = tmp_path / "spill"
    spill.mkdir()
    worker.store.spill_size = 1000
    worker.store.folder = str(spill)
    worker.store.resident_bytes = 0  # no RAM to spare: big entries go to disk
    hint = yield make_large(worker, client, "spilled")
    [spilled] = list(spill.iterdir())
    stored = spilled.read_bytes()
    assert len(stored) > worker.store.spill_size
    replies = yield defer.gatherResults([fetch(worker, hint["msg_id"]) for _ in range(3)])
    for response, body in replies:
        assert response.code == 200
        assert body == stored
    assert json.loads(stored)["id"] == "spilled"
    assert base64.b64decode(json.loads(stored)["result"]["data"]) == b"q" * 3000

    # A fetch now ends the entry's life: its file goes with it.
    worker.store.grace = 0
    response, body = yield fetch(worker, hint["msg_id"])
    assert (response.code, body) == (200, stored)
    worker.store.expire()
    assert list(spill.iterdir()) == []
    response, _ = yield fetch(worker, hint["msg_id"])
    assert response.code == 404


@pytest_twisted.inlineCallbacks
def test_value_of_several_chunks_is_held_once_and_served_exactly(start):
    """
    A value over L{wire.CHUNK}, fetched twice: both replies hold the same
    raw bytes, and each body, base64'd piece by piece as it is sent, is exact.
    """
    worker = yield start(*SMALL_FRAMES, "--max-upload-size", str(16 * 2**20))
    client = yield worker.connect()
    nid = yield add_upper(client)
    value = "abc\u00e9" * 600_001  # 3 000 005 bytes of UTF-8: base64 with padding
    start_at = len(client.transcript)
    command = {"type": "cmd", "cmd": "set_io_value", "id": "set",
               "kwargs": {"nid": nid, "ioid": "s", "value": value}}
    response = yield worker.http.post(worker.url("/message/"), data=json.dumps(command).encode())
    assert (response.code, (yield response.content())) == (200, b"Message received")
    yield client.wait_for(is_large, start=start_at)  # the result of set_io_value
    hints = []
    for msgid in ("full-1", "full-2"):
        start_at = len(client.transcript)
        client.send_json({"type": "cmd", "cmd": "get_io_full_value", "id": msgid,
                          "kwargs": {"nid": nid, "ioid": "s"}})
        hints.append((yield client.wait_for(is_large, start=start_at)))
    first, second = (worker.store._entries[hint["msg_id"]].message for hint in hints)
    assert first.parts[1] is second.parts[1]
    assert len(first) > 2 * wire.CHUNK
    for hint, msgid in zip(hints, ("full-1", "full-2")):
        response, body = yield fetch(worker, hint["msg_id"])
        assert response.code == 200 and response.length == len(body)
        message = json.loads(body)
        assert message["id"] == msgid
        assert base64.b64decode(message["result"]["data"]).decode() == value


def test_message_bodies_go_out_in_big_writes():
    class Connection:
        SEND_LIMIT = 128 * 1024

    connection = Connection()
    resources._big_writes(connection)
    assert connection.SEND_LIMIT == wire.CHUNK
    other = StringTransport()
    resources._big_writes(other)
    assert not hasattr(other, "SEND_LIMIT")


def test_the_site_keeps_no_timer_and_dates_log_lines_when_written():
    clock = Clock()
    site = resources.make_site(Resource())
    site.reactor = clock
    site.startFactory()
    assert clock.getDelayedCalls() == [], "an idle worker would wake every second"
    site._logFile = lines = io.StringIO()
    clock.advance(86400 * 3 + 7)
    request = DummyRequest([b"worker"])
    request.code, request.sentLength, request.clientproto = 200, 2, b"HTTP/1.1"
    site.log(request)
    assert "[04/Jan/1970:00:00:07 +0000]" in lines.getvalue()
    site.stopFactory()


@pytest_twisted.inlineCallbacks
def test_post_message_runs_a_command_too_big_for_a_frame(start):
    worker = yield start(*SMALL_FRAMES)
    client = yield worker.connect()
    nid = yield add_upper(client)
    value = "v" * (MAX_MESSAGE + 2000)

    # Over the large-message threshold, where the UI posts instead.
    command = {"type": "cmd", "cmd": "set_default_value", "id": "post-1",
               "kwargs": {"nid": nid, "ioid": "s", "value": value}}
    body = json.dumps(command).encode()
    assert len(body) > MAX_MESSAGE
    start_at = len(client.transcript)
    response = yield worker.http.post(
        worker.url("/message/"), data=body, headers={"content-type": "application/json"}
    )
    assert response.code == 200
    assert (yield response.content()) == b"Message received"
    reply = yield client.wait_for(lambda m: m.get("id") == "post-1", start=start_at)
    assert reply == {"type": "result", "result": True, "id": "post-1"}
    assert worker.service.worker.nodespace.get_node_by_id(nid).get_input("s").default == value

    # A big result goes out as a large message, to the connected client.
    command = {"type": "cmd", "cmd": "set_io_value", "id": "post-2",
               "kwargs": {"nid": nid, "ioid": "s", "value": value}}
    start_at = len(client.transcript)
    response = yield worker.http.post(worker.url("/message/"), data=json.dumps(command).encode())
    assert (response.code, (yield response.content())) == (200, b"Message received")
    hint = yield client.wait_for(is_large, start=start_at)
    _, fetched = yield fetch(worker, hint["msg_id"])
    assert json.loads(fetched) == {"type": "result", "result": value, "id": "post-2"}

    # A failing command is still "received"; its error goes over the WebSocket.
    start_at = len(client.transcript)
    command = {"type": "cmd", "cmd": "no_such_command", "id": "post-3"}
    response = yield worker.http.post(worker.url("/message/"), data=json.dumps(command).encode())
    assert (response.code, (yield response.content())) == (200, b"Message received")
    error = yield client.wait_for(lambda m: m.get("id") == "post-3", start=start_at)
    assert error["type"] == "error"


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b""],
    ids=["broken", "not-utf8", "array", "empty"],
)
@pytest_twisted.inlineCallbacks
def test_post_message_refuses_what_is_not_a_message(start, body):
    worker = yield start()
    client = yield worker.connect()
    start_at = len(client.transcript)
    response = yield worker.http.post(worker.url("/message/"), data=body)
    assert response.code == 400
    assert (yield response.content()) == b"Error processing message"
    # The HTTP caller got its answer; WebSocket clients hear nothing of it.
    yield client.wait_quiet(0.2)
    assert client.transcript[start_at:] == []


@pytest_twisted.inlineCallbacks
def test_post_message_over_the_body_limit_is_413(start):
    worker = yield start(*UPLOAD_LIMIT)
    command = {"type": "cmd", "cmd": "uuid", "id": "x", "kwargs": {}, "pad": "p" * MAX_UPLOAD}
    response = yield worker.http.post(worker.url("/message/"), data=json.dumps(command).encode())
    assert response.code == 413
    yield response.content()


# endregion
# region uploads


@pytest_twisted.inlineCallbacks
def test_upload_one_file(start):
    worker = yield start()
    response, text = yield upload(worker, [("file", b"hello.txt", b"hello world")])
    assert response.code == 200
    assert json.loads(text) == {"file": "hello.txt"}
    assert header(response, b"content-type") == [b"application/json"]
    assert (worker.files / "hello.txt").read_bytes() == b"hello world"
    # No staging folder is left behind.
    assert [p.name for p in worker.data.iterdir() if p.name.startswith(".upload-")] == []


@pytest_twisted.inlineCallbacks
def test_upload_a_folder(start):
    worker = yield start()
    binary = bytes(range(256)) * 4
    parts = [
        ("file", b"folder/a.txt", b"alpha"),
        ("other", None, b"ignored field"),
        ("file", b"folder/sub/b.bin", binary),
    ]
    response, text = yield upload(worker, parts)
    assert response.code == 200
    assert json.loads(text) == {"file": "folder"}
    assert (worker.files / "folder" / "a.txt").read_bytes() == b"alpha"
    assert (worker.files / "folder" / "sub" / "b.bin").read_bytes() == binary


@pytest_twisted.inlineCallbacks
def test_upload_replaces_an_existing_file(start):
    worker = yield start()
    for content in (b"first version, longer", b"second"):
        response, text = yield upload(worker, [("file", b"doc/same.txt", content)])
        assert (response.code, json.loads(text)) == (200, {"file": "doc/same.txt"})
        assert (worker.files / "doc" / "same.txt").read_bytes() == content


@pytest_twisted.inlineCallbacks
def test_upload_without_a_file_part(start):
    worker = yield start()
    for parts in ([("other", None, b"x")], [("file", b"", b"no name")], []):
        response, text = yield upload(worker, parts)
        assert (response.code, text) == (400, b"No files uploaded")
    assert snapshot(worker.files) == {}


@pytest_twisted.inlineCallbacks
def test_upload_needs_multipart(start):
    worker = yield start()
    for content_type in ("application/json", "text/plain", None):
        headers = {"content-type": content_type} if content_type else {}
        response = yield worker.http.post(
            worker.url("/upload/"), data=b'{"file": 1}', headers=headers
        )
        assert response.code == 400
        yield response.content()
    assert snapshot(worker.files) == {}


TRAVERSALS = {
    "dotdot": b"../x.txt",
    "inner-dotdot": b"a/../../x.txt",
    # Absolute names point into the test's own folder: a regression must not
    # write to /etc (the tests may run as root).
    "absolute": b"{outside}/abs.txt",
    "only-dotdot": b"..",
    # A quoted-pair: the name that arrives is a\..\x (raw backslashes are
    # escape characters in a quoted filename, see the next test).
    "backslash": b"a\\\\..\\\\x.txt",
    "nul": b"a\x00b",
    "symlink": b"link/x.txt",
}


@pytest.mark.parametrize("name", list(TRAVERSALS.values()), ids=list(TRAVERSALS))
@pytest_twisted.inlineCallbacks
def test_upload_traversal_is_refused_and_writes_nothing(start, tmp_path, name):
    worker = yield start()
    outside = tmp_path / "outside"
    outside.mkdir()
    (worker.files / "link").symlink_to(outside, target_is_directory=True)
    name = name.replace(b"{outside}", str(outside).encode())
    before = snapshot(tmp_path)

    # Alone, and after a good part: the good one must not land either.
    alone = [("file", name, b"evil")]
    after_a_good_one = [("file", b"good.txt", b"ok"), ("file", name, b"evil")]
    for parts in (alone, after_a_good_one):
        response, text = yield upload(worker, parts)
        assert response.code == 400, text
        assert snapshot(tmp_path) == before


@pytest_twisted.inlineCallbacks
def test_unescaped_backslashes_stay_inside_files(start, tmp_path):
    """
    In a quoted filename C{\\} escapes the next character, so the parser
    reads C{..\\..\\x} as C{....x}: an odd name, but no way out of files/.
    """
    worker = yield start()
    before = snapshot(tmp_path)
    response, text = yield upload(worker, [("file", b"..\\..\\x.txt", b"data")])
    after = snapshot(tmp_path)
    new = {path for path in after if path not in before}
    if response.code == 200:
        [name] = [p for p in new if after[p] == b"data"]
        assert (tmp_path / name).resolve().parent == worker.files.resolve()
        assert json.loads(text) == {"file": Path(name).name}
    else:
        assert response.code == 400 and new == set()


@pytest_twisted.inlineCallbacks
def test_upload_size_limit(start):
    worker = yield start(*UPLOAD_LIMIT)
    big = os.urandom(MAX_UPLOAD + 1024)
    body, content_type = multipart([("file", b"big.bin", big)])

    response = yield worker.http.post(
        worker.url("/upload/"), data=body, headers={"content-type": content_type}
    )
    assert response.code == 413
    assert (yield response.content()) == b"Upload too large"

    response = yield worker.http.post(
        worker.url("/upload/"), data=ChunkedBody(body), headers={"content-type": content_type}
    )
    assert response.code == 413
    yield response.content()
    assert snapshot(worker.files) == {}

    # Under the limit, chunked encoding works.
    small = os.urandom(MAX_UPLOAD // 2)
    body, content_type = multipart([("file", b"small.bin", small)])
    response = yield worker.http.post(
        worker.url("/upload/"), data=ChunkedBody(body), headers={"content-type": content_type}
    )
    assert (response.code, json.loads((yield response.content()))) == (200, {"file": "small.bin"})
    assert (worker.files / "small.bin").read_bytes() == small


@pytest_twisted.inlineCallbacks
def test_upload_command_obeys_the_same_rules(start, tmp_path):
    worker = yield start()
    client = yield worker.connect()
    outside = tmp_path / "outside"
    outside.mkdir()
    (worker.files / "link").symlink_to(outside, target_is_directory=True)
    data = base64.b64encode(b"over the socket").decode()

    assert (yield client.call("upload", data=data, filename="ws/x.txt")) == "ws/x.txt"
    assert (worker.files / "ws" / "x.txt").read_bytes() == b"over the socket"
    other = base64.b64encode(b"replaced").decode()
    assert (yield client.call("upload", data=other, filename="ws/x.txt")) == "ws/x.txt"
    assert (worker.files / "ws" / "x.txt").read_bytes() == b"replaced"

    before = snapshot(tmp_path)
    bad = ["../x.txt", "a/../../x.txt", str(outside / "abs.txt"), "..",
           "a\\..\\x.txt", "a\x00b", "link/x.txt", ""]
    for filename in bad:
        with pytest.raises(CommandError):
            yield client.call("upload", data=data, filename=filename)
    with pytest.raises(CommandError):
        yield client.call("upload", data="not base64!", filename="fine.txt")
    assert snapshot(tmp_path) == before


# endregion
# region CORS and origins


@pytest.mark.parametrize("path", ["/message/", "/upload/"])
@pytest_twisted.inlineCallbacks
def test_preflight_from_a_loopback_origin(start, path):
    worker = yield start()
    response = yield worker.http.request(
        "OPTIONS",
        worker.url(path),
        headers={
            "origin": LOOPBACK_ORIGIN,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, x-requested-with",
        },
    )
    yield response.content()
    assert response.code == 204
    assert header(response, b"access-control-allow-origin") == [LOOPBACK_ORIGIN.encode()]
    [methods] = header(response, b"access-control-allow-methods")
    assert b"POST" in methods and b"OPTIONS" in methods
    assert header(response, b"access-control-allow-headers") == [b"content-type, x-requested-with"]


@pytest.mark.parametrize("path", ["/message/", "/upload/"])
@pytest_twisted.inlineCallbacks
def test_preflight_from_a_foreign_origin_is_refused(start, path):
    worker = yield start()
    response = yield worker.http.request(
        "OPTIONS", worker.url(path),
        headers={"origin": EVIL_ORIGIN, "access-control-request-method": "POST"},
    )
    yield response.content()
    assert response.code == 403
    assert header(response, b"access-control-allow-origin") is None


@pytest_twisted.inlineCallbacks
def test_foreign_origin_cannot_upload_or_post_or_read(start, tmp_path):
    worker = yield start(*SMALL_FRAMES)
    client = yield worker.connect()
    hint = yield make_large(worker, client, "private")
    before = snapshot(tmp_path)
    response, text = yield upload(worker, [("file", b"x.txt", b"evil")], {"origin": EVIL_ORIGIN})
    assert response.code == 403
    assert header(response, b"access-control-allow-origin") is None
    assert snapshot(tmp_path) == before

    command = json.dumps({"type": "cmd", "cmd": "clear", "id": "evil"}).encode()
    response = yield worker.http.post(worker.url("/message/"), data=command,
                                      headers={"origin": EVIL_ORIGIN})
    yield response.content()
    assert response.code == 403
    assert len(worker.service.worker.nodespace.nodes) == 1  # not cleared

    response, body = yield fetch(worker, hint["msg_id"], headers={"origin": EVIL_ORIGIN})
    assert response.code == 403 and b"private" not in body

    # The same requests from a loopback page work, with CORS headers.
    response, text = yield upload(
        worker, [("file", b"x.txt", b"fine")], {"origin": LOOPBACK_ORIGIN}
    )
    assert response.code == 200
    assert header(response, b"access-control-allow-origin") == [LOOPBACK_ORIGIN.encode()]
    assert (worker.files / "x.txt").read_bytes() == b"fine"
    response, body = yield fetch(worker, hint["msg_id"], headers={"origin": LOOPBACK_ORIGIN})
    assert response.code == 200 and json.loads(body)["id"] == "private"
    # Without an Origin (not a browser): no CORS headers at all.
    response, _ = yield fetch(worker, hint["msg_id"])
    assert response.code == 200 and header(response, b"access-control-allow-origin") is None


@pytest.mark.parametrize(
    "allowed, origin",
    [(EVIL_ORIGIN, EVIL_ORIGIN), ("*", "http://any.example:8080")],
    ids=["listed", "star"],
)
@pytest_twisted.inlineCallbacks
def test_allow_origin_option(start, allowed, origin):
    worker = yield start("--allow-origin", allowed)
    response = yield worker.http.request(
        "OPTIONS", worker.url("/upload/"),
        headers={"origin": origin, "access-control-request-method": "POST"},
    )
    yield response.content()
    assert response.code == 204
    assert header(response, b"access-control-allow-origin") == [origin.encode()]
    response, text = yield upload(worker, [("file", b"allowed.txt", b"yes")], {"origin": origin})
    assert (response.code, json.loads(text)) == (200, {"file": "allowed.txt"})
    assert (worker.files / "allowed.txt").read_bytes() == b"yes"
    client = yield worker.connect(headers={"Origin": origin})
    assert (yield client.call("uuid")) == "http_w"


WS_HANDSHAKE = {
    "upgrade": "websocket",
    "connection": "Upgrade",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
    "sec-websocket-version": "13",
}


@pytest_twisted.inlineCallbacks
def test_websocket_origin_check(start):
    worker = yield start()
    response = yield worker.http.get(
        worker.url("/"), headers={**WS_HANDSHAKE, "origin": EVIL_ORIGIN}
    )
    yield response.content()
    assert response.code == 403

    with pytest.raises(ConnectionError):
        yield ws_connect(worker, headers={"Origin": EVIL_ORIGIN})

    for origin in (None, LOOPBACK_ORIGIN, "http://127.0.0.1:3000"):
        headers = {"Origin": origin} if origin else None
        client = yield worker.connect(headers=headers, listening=False)
        assert (yield client.call("uuid")) == "http_w"
    # The refused handshake left no client behind.
    assert len(worker.service.hub.clients) == 3


# endregion
# region binary chunking


def chunks_of(client, msgid, start_at=0):
    return [
        m for m in client.transcript[start_at:]
        if m.get("binary") and m["header"].get("type") == "result"
        and m["header"].get("id") == msgid
    ]


def last_chunk(msgid):
    def match(m):
        if not (m.get("binary") and m["header"].get("id") == msgid):
            return False
        n, total = m["chunk"].split("/")
        return n == total

    return match


@pytest_twisted.inlineCallbacks
def test_binary_results_arrive_in_chunks(start):
    worker = yield start("--max-binary-frame", str(BINARY_FRAME))
    client = yield worker.connect()
    text = "".join(chr(0x41 + i % 26) for i in range(1500)) + "ünïcødé ✓"
    nid = yield add_upper(client)
    yield client.call("set_io_value", nid=nid, ioid="s", value=text)

    enc = (yield client.call("add_node", id="string.encode"))["id"]
    start_at = len(client.transcript)
    yield client.call("set_io_value", nid=enc, ioid="s", value=text)
    yield client.wait_for(
        lambda m: m.get("binary") and m["header"].get("io") == "encoded", start=start_at
    )

    for msgid, (node, ioid), expected, mime in [
        ("c1", (nid, "s"), text.encode("utf-8"), "text/plain"),
        ("c2", (enc, "encoded"), text.encode("utf-8"), "application/octet-stream"),
    ]:
        start_at = len(client.transcript)
        first = yield client.call(
            "get_io_full_value", nid=node, ioid=ioid, as_bytes=True, msg_id=msgid
        )
        assert first["chunk"].startswith("1/")
        yield client.wait_for(last_chunk(msgid), start=start_at)
        frames = chunks_of(client, msgid, start_at)
        total = len(frames)
        assert total > 1
        assert [f["chunk"] for f in frames] == [f"{i}/{total}" for i in range(1, total + 1)]
        assert len({f["msgid"] for f in frames}) == 1
        assert all(f["header"] == {"id": msgid, "mime": mime, "type": "result"} for f in frames)
        assert b"".join(f["payload"] for f in frames) == expected

    # Every frame, header included, fits the limit.
    sizes = []
    proto = client._proto
    original = proto.onMessage

    def record(payload, isBinary):
        if isBinary:
            sizes.append(len(payload))
        original(payload, isBinary)

    proto.onMessage = record
    start_at = len(client.transcript)
    yield client.call("get_io_full_value", nid=nid, ioid="s", as_bytes=True, msg_id="c3")
    yield client.wait_for(last_chunk("c3"), start=start_at)
    assert sizes and max(sizes) <= BINARY_FRAME


@pytest_twisted.inlineCallbacks
def test_a_frame_too_small_for_its_header_gives_an_error(start):
    worker = yield start("--max-binary-frame", str(BINARY_FRAME))
    client = yield worker.connect()
    nid = yield add_upper(client)
    yield client.call("set_io_value", nid=nid, ioid="s", value="abc")
    worker.service.hub.max_binary_frame = 64
    with pytest.raises(CommandError, match="header"):
        yield client.call("get_io_full_value", nid=nid, ioid="s", as_bytes=True, msg_id="tiny")


# endregion
# region export and import


@defer.inlineCallbacks
def build_graph(client, upload_name="data/readme.txt", content=b"exported file"):
    """
    Two add nodes, an edge, a default and an uploaded file; returns what to expect.
    """
    n1 = (yield client.call("add_node", id="add_node", timeout=20))["id"]
    n2 = (yield client.call("add_node", id="add_node"))["id"]
    yield client.call("set_default_value", nid=n1, ioid="a", value=41)
    yield client.call("add_edge", src_nid=n1, src_ioid="out", trg_nid=n2, trg_ioid="a")
    data = base64.b64encode(content).decode()
    assert (yield client.call("upload", data=data, filename=upload_name)) == upload_name
    return {
        "nodes": {n1, n2}, "edge": [n1, "out", n2, "a"], "file": (upload_name, content), "n1": n1
    }


@defer.inlineCallbacks
def check_graph(client, files_root, expected):
    nodes = yield client.call("get_nodes")
    assert {n["id"] for n in nodes} == expected["nodes"]
    n1 = next(n for n in nodes if n["id"] == expected["n1"])
    assert next(io for io in n1["io"] if io["id"] == "a")["default"] == 41
    edges = yield client.call("get_edges")
    assert expected["edge"] in edges
    name, content = expected["file"]
    assert (Path(files_root) / name).read_bytes() == content


def zip_names(b64):
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(b64))) as archive:
        config, state = (json.loads(archive.read(name)) for name in ("config", "state"))
        return archive.namelist(), config, state


@pytest_twisted.inlineCallbacks
def test_export_and_import_into_a_fresh_worker(start):
    source = yield start(name="source")
    client = yield source.connect()
    expected = yield build_graph(client)
    exported = yield client.call("export_worker")
    assert isinstance(exported, str)
    names, config, state = zip_names(exported)
    assert {"config", "state", "files/data/readme.txt"} <= set(names)
    assert "funcnodes-basic" in config["package_dependencies"]
    for local in ("pid", "uuid", "host", "port", "data_path"):
        assert local not in config
    assert {n["id"] for n in state["backend"]["nodes"]} == expected["nodes"]

    without = yield client.call("export_worker", with_files=False)
    assert not any(n.startswith("files/") for n in zip_names(without)[0])

    target = yield start(name="target")
    other = yield target.connect()
    assert (yield other.call("get_nodes")) == []
    assert (yield other.call("update_from_export", data=exported, timeout=20)) is None
    yield check_graph(other, target.files, expected)


def evil_zip(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("config", json.dumps({"package_dependencies": {}}))
        archive.writestr("state", json.dumps({"backend": {"nodes": [], "edges": []}}))
        for name, content in members:
            archive.writestr(zipfile.ZipInfo(name), content)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "member",
    ["files/../evil", "files/a/../../evil", "files/{outside}/evil", "files/a\\..\\..\\evil",
     "files/link/evil"],
    ids=["dotdot", "inner-dotdot", "absolute", "backslash", "symlink"],
)
@pytest_twisted.inlineCallbacks
def test_import_refuses_a_member_outside_files(start, tmp_path, member):
    worker = yield start()
    client = yield worker.connect()
    nid = yield add_upper(client)
    outside = tmp_path / "outside"
    outside.mkdir()
    (worker.files / "link").symlink_to(outside, target_is_directory=True)
    member = member.replace("{outside}", str(outside))
    before = snapshot(tmp_path)
    data = evil_zip([("files/ok.txt", b"fine"), (member, b"evil")])
    with pytest.raises(CommandError):
        yield client.call("update_from_export", data=data)
    assert snapshot(tmp_path) == before
    # Nothing was applied either: the graph is untouched.
    assert [n["id"] for n in (yield client.call("get_nodes"))] == [nid]


@pytest.mark.reference
@pytest_twisted.inlineCallbacks
def test_export_round_trip_with_the_reference(start, tmp_path):
    from workers import start_reference

    ref = yield start_reference(tmp_path)
    try:
        rclient = yield wsclient.connect(reactor, ref.url)
        try:
            yield rclient.call("add_package_dependency", name="funcnodes-basic", timeout=60)
            expected = yield build_graph(rclient, "ref/hello.txt", b"from the reference")
            exported = yield rclient.call("export_worker", timeout=20)

            ours = yield start(name="ours")
            client = yield ours.connect()
            yield client.call("update_from_export", data=exported, timeout=30)
            yield check_graph(client, ours.files, expected)

            # And back: ours -> a cleared reference.
            mine = yield build_graph(client, "ours/back.txt", b"from funcnodes_tw")
            mine["nodes"] |= expected["nodes"]
            ours_export = yield client.call("export_worker")
            yield rclient.call("clear")
            (ref.data_path / "files" / "ref" / "hello.txt").unlink()
            yield rclient.call("update_from_export", data=ours_export, timeout=60)
            yield check_graph(rclient, ref.data_path / "files", mine)
            # The reference's own file made the trip there and back.
            returned = ref.data_path / "files" / "ref" / "hello.txt"
            assert returned.read_bytes() == b"from the reference"
        finally:
            yield rclient.close()
    finally:
        yield ref.stop()


# endregion


# region slow clients


@pytest_twisted.inlineCallbacks
def test_a_client_that_stops_reading_is_cut_off_while_others_keep_up(start):
    """
    A client that stops reading may not grow the worker's memory beyond
    --max-client-queue: it is disconnected, and the others get every event.
    """
    limit = 256 * 1024
    worker = yield start("--max-client-queue", str(limit), "--max-message-size", str(8 << 20))
    fast = yield worker.connect()
    slow = yield worker.connect()
    slow_port = slow._proto.transport.getHost().port
    (server,) = [p for p in worker.service.hub.clients if p.transport.getPeer().port == slow_port]
    slow._proto.transport.pauseProducing()  # stop reading: its TCP window fills up

    peak = 0
    name = "n" * 100_000
    for _ in range(150):  # ~30 MB of node_added events, far beyond the socket buffers
        yield fast.call("add_node", id="add_node", name=name)
        peak = max(peak, server.outbox.size)
    yield fast.wait_quiet(0.3)

    added = [m for m in fast.transcript if m.get("event") == "node_added"]
    assert len(added) == 150, "the client that keeps up gets every event"
    assert server.outbox.overflowed, "the slow client was cut off"
    assert server not in worker.service.hub.clients
    assert peak <= limit + 300_000, f"at most one message beyond the bound waited ({peak})"
    slow._proto.transport.resumeProducing()
    yield slow.when_closed()
