"""
Who may use a worker: the token (C{--token}, or C{"token"} in the worker
config file) on every route, tracebacks only with C{--debug}, and TLS
(C{--listen ssl:...}) for WebSocket, HTTP and the real UI in Chromium.
"""

import json
import os
import subprocess
import sys
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import utils
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from funcnodes_tw import uploads
from inprocess import (
    TOKEN,
    Cert,
    failing,
    handshake,
    multipart,
    recorder,
    start,  # noqa: F401  (fixture)
    texts,
    ws_connect,
)
from wsclient import CommandError

SOURCES = ["cli", "config"]
PARKED = b'{"type": "result", "result": "parked", "id": "p"}'
POSTED = json.dumps(
    {"type": "cmd", "cmd": "test_record", "kwargs": {"value": "posted"}, "id": "post"}
).encode()

#: name: (method, path, body)
ROUTES = {
    "GET /message/<id>": ("GET", "/message/{msgid}", None),
    "POST /message/": ("POST", "/message/", "message"),
    "POST /upload/": ("POST", "/upload/", "upload"),
    "GET /worker": ("GET", "/worker", None),
    "GET /static/index.html": ("GET", "/static/index.html", None),
    "GET /": ("GET", "/", None),
}
ACCEPTED = {
    "GET /message/<id>": 200,
    "POST /message/": 200,
    "POST /upload/": 200,
    "GET /worker": 200,
    "GET /static/index.html": 200,
    "GET /": 302,  # to the UI
}


#: The token cookie of the worker L{start} names C{w} (uuid C{http_w}).
COOKIE = "funcnodes_token_http_w"


def with_token(start, source, *args, token=TOKEN, **kw):
    if source == "cli":
        return start("--token", token, *args, **kw)
    return start(*args, config={"token": token}, **kw)


def credentials(auth, token, cookie=COOKIE):
    """
    (query, headers) presenting C{token} the way C{auth} says.
    """
    if auth is None:
        return "", {}
    if auth == "query":
        return f"?token={token}", {}
    if auth == "bearer":
        return "", {"Authorization": f"Bearer {token}"}
    if auth == "cookie":
        return "", {"Cookie": f"{cookie}={token}"}
    raise ValueError(auth)


def request(worker, http, route, path_suffix="", headers=None, msgid="none"):
    method, path, body = ROUTES[route]
    headers = dict(headers or {})
    data = None
    if body == "message":
        data = POSTED
        headers["Content-Type"] = "application/json"
    elif body == "upload":
        data, headers["Content-Type"] = multipart("a.txt", b"uploaded")
    url = worker.url(path.format(msgid=msgid) + path_suffix)
    return http.request(method, url, headers=headers, data=data, allow_redirects=False)


# region token


def staging(monkeypatch):
    """
    Record every upload body that starts to be parsed into staging.
    """
    started = []
    parse = uploads.MultipartUpload
    monkeypatch.setattr(uploads, "MultipartUpload", lambda *a: started.append(a) or parse(*a))
    return started


@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_every_route_refuses_a_request_without_the_right_token(start, monkeypatch, source):
    calls = recorder(monkeypatch)
    staged = staging(monkeypatch)
    worker = yield with_token(start, source)
    assert worker.settings.token == TOKEN
    msgid = worker.store.put(PARKED)
    attempts = [(None, TOKEN)]
    attempts += [(auth, "wrong") for auth in ("query", "bearer", "cookie")]
    attempts += [("query", ""), ("query", TOKEN[:-1]), ("query", TOKEN + "x")]
    attempts += [("bearer", TOKEN.upper()), ("query", TOKEN + "%00")]
    # The right token in a cookie of another worker, or in the unscoped name.
    attempts += [("cookie", TOKEN, c) for c in ("funcnodes_token_http_other", "funcnodes_token")]
    for auth, token, *cookie in attempts:
        query, headers = credentials(auth, token, *cookie)
        for route in ROUTES:
            response = yield request(worker, worker.new_http(), route, query, headers, msgid)
            body = yield response.content()
            where = f"{route} with {auth}={token!r}"
            assert response.code == 401, f"{where}: {response.code} {body[:200]!r}"
            assert body == b"A valid token is required", where
            assert response.headers.getRawHeaders("www-authenticate") == [
                'Bearer realm="funcnodes"'
            ]
            assert not response.headers.hasHeader("set-cookie"), where
        status, _ = yield handshake(worker, "/" + query, headers)
        assert status == 401, f"WebSocket handshake with {auth}={token!r}"
        with pytest.raises(ConnectionError):
            yield ws_connect(worker, "/" + query, headers)
    # The Authorization header needs its scheme.
    response = yield worker.new_http().get(
        worker.url("/worker"), headers={"Authorization": TOKEN}
    )
    yield response.content()
    assert response.code == 401
    assert calls == [], "a refused POST /message/ ran its command"
    assert not worker.files.joinpath("a.txt").exists(), "a refused upload was stored"
    assert staged == [], "a refused upload's body was written to staging"
    assert worker.service.hub.clients == set()


@pytest.mark.parametrize("auth", ["query", "bearer", "cookie"])
@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_every_route_accepts_the_token(start, monkeypatch, source, auth):
    calls = recorder(monkeypatch)
    staged = staging(monkeypatch)
    worker = yield with_token(start, source)
    msgid = worker.store.put(PARKED)
    query, headers = credentials(auth, TOKEN)
    for route in ROUTES:
        response = yield request(worker, worker.new_http(), route, query, headers, msgid)
        body = yield response.content()
        assert response.code == ACCEPTED[route], f"{route}: {response.code} {body[:200]!r}"
        if route == "GET /message/<id>":
            assert body == PARKED
        elif route == "POST /message/":
            assert body == b"Message received" and calls == ["posted"]
        elif route == "POST /upload/":
            assert json.loads(body) == {"file": "a.txt"}
            assert worker.files.joinpath("a.txt").read_bytes() == b"uploaded"
            assert len(staged) == 1, "the upload was not parsed as it arrived"
        elif route == "GET /worker":
            assert json.loads(body)["uuid"] == worker.uuid
        elif route == "GET /static/index.html":
            assert b"<html" in body.lower()
        elif route == "GET /":
            # A token that came in the URL goes on in the page's URL and its worker_url.
            ui = f"static/index.html?worker_url=ws://127.0.0.1:{worker.port}/"
            if auth == "query":
                ui = ui.replace("?", f"?token={TOKEN}&") + f"%3Ftoken%3D{TOKEN}"
            assert response.headers.getRawHeaders("location") == [ui]
    client = yield worker.connect("/" + query, headers)
    assert (yield client.call("uuid")) == worker.uuid
    assert (yield client.call("test_record", value="over ws")) == "over ws"


@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_the_uis_urls_carry_the_token_in_the_query(start, monkeypatch, source):
    """
    Given C{ws://host:port/?token=T}, the UI fetches C{/?token=T/message/<id>}
    and posts to C{/?token=T/message/} and C{/?token=T/upload/}.
    """
    calls = recorder(monkeypatch)
    worker = yield with_token(start, source)
    msgid = worker.store.put(PARKED)
    base = worker.url(f"/?token={TOKEN}/")

    response = yield worker.new_http().get(base + f"message/{msgid}")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json; charset=utf-8"]
    assert (yield response.content()) == PARKED

    response = yield worker.new_http().get(base + "message/not-there")
    assert response.code == 404
    yield response.content()

    response = yield worker.new_http().post(
        base + "message/", data=POSTED, headers={"Content-Type": "application/json"}
    )
    assert (response.code, (yield response.content())) == (200, b"Message received")
    assert calls == ["posted"]

    body, content_type = multipart("ui.txt", b"from the ui")
    response = yield worker.new_http().post(
        base + "upload/", data=body, headers={"Content-Type": content_type}
    )
    assert response.code == 200
    assert json.loads((yield response.content())) == {"file": "ui.txt"}
    assert worker.files.joinpath("ui.txt").read_bytes() == b"from the ui"

    for wrong in ("wrong", "", TOKEN[:-1]):
        for path, data in ((f"message/{msgid}", None), ("message/", POSTED), ("upload/", body)):
            method = "GET" if data is None else "POST"
            response = yield worker.new_http().request(
                method, worker.url(f"/?token={wrong}/{path}"), data=data
            )
            assert response.code == 401, (wrong, path)
            yield response.content()
    assert calls == ["posted"]


@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_the_cookie_set_after_a_token_request_is_accepted(start, monkeypatch, source):
    recorder(monkeypatch)
    worker = yield with_token(start, source)
    msgid = worker.store.put(PARKED)
    http = worker.new_http()  # keeps cookies
    response = yield http.get(worker.url(f"/worker?token={TOKEN}"))
    yield response.content()
    [cookie] = response.headers.getRawHeaders("set-cookie")
    pair, *attributes = [part.strip() for part in cookie.split(";")]
    assert pair == f"{COOKIE}={TOKEN}"
    assert {a.lower() for a in attributes} == {"path=/", "httponly", "samesite=strict"}

    for route in ROUTES:  # no token: the client's cookie jar sends the cookie
        response = yield request(worker, http, route, msgid=msgid)
        body = yield response.content()
        assert response.code == ACCEPTED[route], f"{route}: {response.code} {body[:200]!r}"
        assert not response.headers.hasHeader("set-cookie"), "set again"
    client = yield worker.connect(headers={"Cookie": pair})
    assert (yield client.call("uuid")) == worker.uuid


@pytest_twisted.inlineCallbacks
def test_two_workers_on_one_host_keep_their_own_cookies(start):
    """
    Cookies belong to a host, not to a port: a browser that opened two
    workers on one host, each with its token, must stay let in to both.
    """
    first = yield start("--token", "first-token", name="w")
    second = yield start("--token", "second-token", name="other")
    http = first.new_http()  # one cookie jar for both, as in a browser
    for worker, token in ((first, "first-token"), (second, "second-token")):
        response = yield http.get(worker.url(f"/?token={token}"), allow_redirects=False)
        yield response.content()
        assert response.code == 302
    assert sorted(c.name for c in http._cookiejar) == [
        "funcnodes_token_http_other", "funcnodes_token_http_w"
    ]
    assert {c.port for c in http._cookiejar} == {None}, "the jar must not scope by port"
    for worker in (first, second, first):
        for route in ("GET /worker", "GET /static/index.html", "GET /message/<id>"):
            response = yield request(worker, http, route, msgid=worker.store.put(PARKED))
            body = yield response.content()
            assert response.code == 200, f"{worker.uuid} {route}: {response.code} {body!r}"


@pytest_twisted.inlineCallbacks
def test_a_mounted_worker_scopes_its_cookie_to_its_path(tmp_path, clean_reactor):
    """
    Two workers mounted in one host application share host and port: the
    cookie of the one at C{/fn/} is for C{/fn/} only.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from treq.client import HTTPClient

    from funcnodes_tw.service import create

    worker = create(
        "mounted", data_path=tmp_path / "data", workers_dir=tmp_path / "workers",
        clock=reactor, token=TOKEN,
    )
    root = Resource()
    root.putChild(b"fn", worker.resource)
    worker.startService()
    port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    base = f"http://127.0.0.1:{port.getHost().port}/fn/"
    try:
        response = yield http.get(base + f"?token={TOKEN}", allow_redirects=False)
        yield response.content()
        assert response.headers.getRawHeaders("location") == [
            f"static/index.html?token={TOKEN}"
            f"&worker_url=ws://127.0.0.1:{port.getHost().port}/fn/%3Ftoken%3D{TOKEN}"
        ]
        [cookie] = response.headers.getRawHeaders("set-cookie")
        pair, *attributes = [part.strip() for part in cookie.split(";")]
        assert pair == f"funcnodes_token_mounted={TOKEN}"
        assert "path=/fn/" in {a.lower() for a in attributes}
        response = yield http.get(base + "worker")
        assert json.loads((yield response.content()))["uuid"] == "mounted"
    finally:
        yield worker.stopService()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_refusals_are_logged_with_a_reason_and_tokens_never(start):
    """
    A refused request leaves a warning naming the reason (once per peer and
    reason: a FuncNodes manager retries every 10 s), and neither that nor the
    access log shows a token, right or wrong.
    """
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        worker = yield with_token(start, "cli")
        for path in ("/", "/", "/?token=wrong-guess"):
            status, _ = yield handshake(worker, path)
            assert status == 401
        page = worker.url(f"/static/index.html?worker_url=ws%3A%2F%2Fh%2F%3Ftoken%3D{TOKEN}")
        for path in (f"/?token={TOKEN}", f"/?token={TOKEN}/message/none", "/worker"):
            response = yield worker.new_http().get(
                worker.url(path),
                headers={"Referer": page, "Cookie": f"{COOKIE}={TOKEN}"},
                allow_redirects=False,
            )
            yield response.content()
            assert response.code in (302, 404, 200)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [(e.get("log_level"), formatEvent(e)) for e in events]
    refusals = [(level, text) for level, text in lines if text.startswith("Refused")]
    assert refusals == [
        (LogLevel.warn, "Refused GET / from 127.0.0.1: no token (401)"),
        (LogLevel.debug, "Refused GET / from 127.0.0.1: no token (401)"),
        (LogLevel.warn, "Refused GET / from 127.0.0.1: a wrong token (401)"),
    ]
    access = [text for _, text in lines if '"GET /' in text]
    assert len(access) == 6, access
    assert '"GET /?token=<redacted> HTTP/1.1" 401' in access[2]
    assert '"GET /?token=<redacted>/message/none HTTP/1.1" 404' in access[4]
    assert f"{page.split('%3D')[0]}%3D<redacted>" in access[5]
    leaks = [text for _, text in lines if TOKEN in text or "wrong-guess" in text]
    assert leaks == []


#: The FuncNodes manager's own probe of a worker (PyPI funcnodes 1.7.1), in a
#: process of its own: funcnodes reads FUNCNODES_CONFIG_DIR at import.
MANAGER_CHECK = r"""
import asyncio, json, sys
from funcnodes.worker.worker_manager import check_worker

config = {"uuid": sys.argv[1], "host": "127.0.0.1", "port": int(sys.argv[2])}
try:
    print("RESULT", json.dumps(asyncio.run(check_worker(config))))
except Exception as exc:
    print("RAISED", type(exc).__name__, getattr(exc, "status", None))
"""


@pytest_twisted.inlineCallbacks
def test_the_funcnodes_manager_is_refused_at_once(start, tmp_path):
    """
    The manager connects to C{ws://host:port} and has no way to send a token
    (docs/deployment.md): its probe gets a 401 at once, not a hang.
    """
    protected = yield with_token(start, "cli")
    open_worker = yield start(name="open")
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(tmp_path / "fnconfig"))
    for worker, expected in (
        (open_worker, f'RESULT ["{open_worker.uuid}", true]'),
        (protected, "RAISED WSServerHandshakeError 401"),
    ):
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["-c", MANAGER_CHECK, worker.uuid, str(worker.port)], env=env
        )
        assert code == 0, err.decode()
        assert out.decode().strip().splitlines()[-1] == expected


#: What a token holder from a foreign origin gets: the routes that act or
#: answer with data refuse the origin (403); the page and /worker answer, but
#: without CORS headers, so the foreign page cannot read them.
FOREIGN = {
    "GET /message/<id>": 403,
    "POST /message/": 403,
    "POST /upload/": 403,
    "GET /worker": 200,
    "GET /static/index.html": 200,
    "GET /": 302,
}


@pytest_twisted.inlineCallbacks
def test_the_token_is_checked_before_the_origin(start, monkeypatch):
    """
    401 means "who are you?", 403 "not from there": without the token every
    route says 401 whatever the origin; with it, a foreign origin gets 403
    where the origin matters, on the WebSocket as on HTTP.
    """
    calls = recorder(monkeypatch)
    worker = yield with_token(start, "cli")
    msgid = worker.store.put(PARKED)
    foreign = {"Origin": "http://evil.example"}
    for auth, expected in ((None, dict.fromkeys(FOREIGN, 401)), ("bearer", FOREIGN)):
        query, headers = credentials(auth, TOKEN)
        for route in ROUTES:
            sent = {**headers, **foreign}
            response = yield request(worker, worker.new_http(), route, query, sent, msgid)
            body = yield response.content()
            assert response.code == expected[route], f"{route} with {auth}: {body[:100]!r}"
            assert not response.headers.hasHeader("access-control-allow-origin"), route
        status, _ = yield handshake(worker, "/", {**headers, **foreign})
        assert status == (401 if auth is None else 403), auth
    # The UI's form of the URL goes through the same origin check.
    url = worker.url(f"/?token={TOKEN}/message/{msgid}")
    response = yield worker.new_http().get(url, headers=foreign)
    assert (response.code, (yield response.content())) == (403, b"Origin not allowed")
    assert calls == [] and not worker.files.joinpath("a.txt").exists()


@pytest_twisted.inlineCallbacks
def test_the_command_line_token_wins_over_the_config(start):
    worker = yield start("--token", "from-cli", config={"token": "from-config"})
    for token, code in (("from-cli", 200), ("from-config", 401)):
        response = yield worker.new_http().get(worker.url(f"/worker?token={token}"))
        yield response.content()
        assert response.code == code, token


@pytest_twisted.inlineCallbacks
def test_without_a_token_nothing_asks_for_one(start):
    worker = yield start()
    assert worker.settings.token is None
    response = yield worker.new_http().get(worker.url("/worker"))
    assert json.loads((yield response.content()))["ssl"] is False
    assert json.loads(worker.config_file.read_text())["ssl"] is False
    client = yield worker.connect()
    assert (yield client.call("uuid")) == worker.uuid


@pytest.mark.parametrize(
    "args",
    [
        ["--token", ""],
        ["--token", "a/b"],
        ["--token", "with space"],
        ["--token", "plus+sign"],
    ],
    ids=["empty", "slash", "space", "plus"],
)
def test_tokens_that_cannot_travel_in_a_url_are_refused(args, tmp_path, monkeypatch):
    from twisted.python import usage

    from funcnodes_tw import persistence
    from funcnodes_tw.tap import Options

    monkeypatch.setattr(persistence, "workers_dir", lambda: tmp_path / "workers")
    with pytest.raises(usage.UsageError, match="token must be"):
        Options().parseOptions(["--uuid", "t", "--data-path", str(tmp_path), *args])


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"token": "' + TOKEN.encode() + b'"', "not valid JSON"),
        (b'["token"]', "not a JSON object"),
        (b'{"token": "\xff"}', "not valid JSON"),
    ],
    ids=["truncated", "array", "not-utf8"],
)
def test_an_unreadable_config_stops_the_start(tmp_path, content, message):
    """
    A config file that cannot be read is no empty config: that would start
    the worker without its token, and the registration written at start
    would replace the file.
    """
    path = tmp_path / "config" / "workers" / "worker_broken.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(tmp_path / "config"))
    command = [sys.executable, "-m", "funcnodes_tw", "--uuid", "broken"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"funcnodes-tw: {path}: {message}")
    assert path.read_bytes() == content


# endregion
# region tracebacks


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
@pytest_twisted.inlineCallbacks
def test_tracebacks_reach_clients_only_with_debug(start, monkeypatch, debug):
    failing(monkeypatch)
    worker = yield start(*(["--debug"] if debug else []))
    client = yield worker.connect()
    with pytest.raises(CommandError) as failed:
        yield client.call("test_fail", msg_id="f1")
    assert failed.value.error == "deliberate failure"
    with pytest.raises(CommandError):
        yield client.call("no_such_command", msg_id="f2")
    with pytest.raises(CommandError):
        yield client.call("test_fail", msg_id="f3", kwargs={"unexpected": 1})
    errors = [m for m in client.transcript if m.get("type") == "error"]
    assert [e["id"] for e in errors] == ["f1", "f2", "f3"]
    for error in errors:
        assert list(error) == ["type", "error", "tb", "id"]
        if debug:
            assert error["tb"] and all(isinstance(line, str) for line in error["tb"])
        else:
            assert error["tb"] == [], error
    if debug:
        text = "".join(errors[0]["tb"])
        assert "Traceback" in text and "ValueError: deliberate failure" in text
        assert "inprocess.py" in text


# endregion
# region TLS


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return Cert(tmp_path_factory.mktemp("tls"))


@pytest_twisted.inlineCallbacks
def test_wss_and_https(start, monkeypatch, cert):
    texts(monkeypatch)
    worker = yield start("--max-message-size", "1024", tls=cert)
    client = yield worker.connect()
    assert client._proto.factory.isSecure
    assert (yield client.call("uuid")) == worker.uuid

    registration = json.loads(worker.config_file.read_text())
    assert (registration["ssl"], registration["port"]) == (True, worker.port)
    assert worker.service.worker.ssl is True

    response = yield worker.http.get(worker.url("/worker"))
    info = json.loads((yield response.content()))
    assert (info["ssl"], info["port"]) == (True, worker.port)

    response = yield worker.http.get(worker.url("/"), allow_redirects=False)
    yield response.content()
    assert response.code == 302
    assert response.headers.getRawHeaders("location") == [
        f"static/index.html?worker_url=wss://127.0.0.1:{worker.port}/"
    ]

    # A large reply points to an https:// URL, which serves it.
    client.send_json({"type": "cmd", "cmd": "test_text", "kwargs": {"size": 5000}, "id": "big"})
    hint = yield client.wait_for(lambda m: m.get("type") == "large_message")
    assert hint["url"] == f"https://127.0.0.1:{worker.port}/message/{hint['msg_id']}"
    response = yield worker.http.get(hint["url"])
    assert json.loads((yield response.content())) == {
        "type": "result", "result": "x" * 5000, "id": "big"
    }

    # Plain HTTP on the TLS port gets no HTTP answer.
    status, _ = yield handshake(worker, plain=True)
    assert status is None


@pytest.mark.parametrize("source", SOURCES)
@pytest_twisted.inlineCallbacks
def test_wss_with_a_token(start, cert, source):
    worker = yield with_token(start, source, tls=cert)
    status, _ = yield handshake(worker)
    assert status == 401
    client = yield worker.connect(f"/?token={TOKEN}")
    assert (yield client.call("uuid")) == worker.uuid
    response = yield worker.new_http().get(worker.url(f"/?token={TOKEN}"), allow_redirects=False)
    yield response.content()
    assert response.code == 302
    [cookie] = response.headers.getRawHeaders("set-cookie")
    pair, *attributes = [part.strip() for part in cookie.split(";")]
    assert pair == f"{COOKIE}={TOKEN}"
    assert "secure" in {a.lower() for a in attributes}, "over TLS, the cookie stays on TLS"


# endregion
# region the real UI over TLS


@pytest.fixture
def chromium():
    from uidriver import CHROMIUM

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed")
    return CHROMIUM


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.parametrize("token", [None, TOKEN], ids=["tls", "tls+token"])
def test_real_ui_over_https(chromium, cert, tmp_path, token):
    """
    The worker serves the UI itself: C{https://host:port/} redirects to
    C{static/index.html?worker_url=wss://host:port/}, and the page loads the
    library and builds a node over wss. With a token, the first URL carries
    it, the UI's URLs carry it on, and the cookie set in reply lets in what
    the page loads.
    """
    from uidriver import free_port, run_in_thread, stop_process, wait_for_port

    port = free_port()
    worker_uuid = f"tls_{uuid.uuid4().hex[:8]}"
    config = tmp_path / "config"
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(config))
    command = [
        sys.executable, "-m", "funcnodes_tw",
        "--listen", cert.listen(port),
        "--data-path", str(tmp_path / "data"),
        "--uuid", worker_uuid,
    ]
    if token:
        command += ["--token", token]
    logfile = tmp_path / "worker.log"
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, proc, timeout=60)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"worker did not come up: {exc}\n{logfile.read_text()[-3000:]}")
        registration = config / "workers" / f"worker_{worker_uuid}.json"
        deadline = time.monotonic() + 10
        while not registration.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert json.loads(registration.read_text())["ssl"] is True
        url = f"https://127.0.0.1:{port}/" + (f"?token={token}" if token else "")
        run_in_thread(_drive_ui_over_tls, chromium, url, port, token, tmp_path, timeout=120)
    finally:
        stop_process(proc)
    log = logfile.read_text()
    assert f"listening on wss://127.0.0.1:{port}" in log
    assert "Traceback" not in log


def _drive_ui_over_tls(chromium, url, port, token, shots):
    from playwright.sync_api import expect, sync_playwright

    from uidriver import CHROMIUM_ARGS, FuncNodesUI

    expect.set_options(timeout=15_000)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"],
            headless=True,
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(15_000)
            problems, sockets, refused = [], [], []
            page.on("pageerror", lambda exc: problems.append(f"uncaught {exc}"))
            page.on(
                "console",
                lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None,
            )
            page.on("websocket", lambda ws: sockets.append(ws.url))
            page.on("response", lambda r: refused.append(r.url) if r.status == 401 else None)
            ui = FuncNodesUI(page)
            try:
                page.goto(url)
                page_url = f"https://127.0.0.1:{port}/static/index.html"
                page_url += f"?worker_url=wss://127.0.0.1:{port}/"
                if token:
                    page_url = page_url.replace("?", f"?token={token}&") + f"%3Ftoken%3D{token}"
                expect(page).to_have_url(page_url)
                ui.open_library()
                expect(ui.shelf("basics")).to_be_visible()
                page.screenshot(path=str(shots / "01-library.png"))
                add = ui.add_node("add_node", "Add")
                expect(ui.nodes).to_have_count(1)
                expect(add).to_be_visible()
                ui.close_library()
                ui.zoom_out(1.0)
                ui.set_input(add, "a", "2")
                ui.set_input(add, "b", "3.5")
                expect(ui.output_value(add, "out")).to_have_text('"5.5"')
                page.screenshot(path=str(shots / "02-node.png"))
            except Exception:
                page.screenshot(path=str(shots / "99-failure.png"))
                raise
            assert sockets and all(s.startswith(f"wss://127.0.0.1:{port}/") for s in sockets)
            assert not refused, f"refused: {refused}"
            assert not problems, "browser reported errors:\n" + "\n".join(problems)
        finally:
            browser.close()


# endregion
