"""
A worker service in the test's own process, listening on 127.0.0.1 (plain
or TLS), with its own HTTP client: the C{start} fixture, WebSocket and raw
handshake helpers, test-only commands and a self-signed certificate, for the
tests that need to look inside a running worker.
"""

import datetime
import ipaddress
import json

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from twisted.internet import defer, reactor, ssl, task, tcp
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    quoteStringArgument,
    wrapClientTLS,
)
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

import wsclient
from funcnodes_tw import aio, commands, persistence
from funcnodes_tw.tap import Options, makeService

TOKEN = "s3cret-Token_1"


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


# region certificate


class Cert:
    """
    A self-signed certificate for 127.0.0.1 and localhost, written to files.
    """

    def __init__(self, folder):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        folder.mkdir(parents=True, exist_ok=True)
        self.key_path = folder / "key.pem"
        self.cert_path = folder / "cert.pem"
        self.key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        self.pem = cert.public_bytes(serialization.Encoding.PEM)
        self.cert_path.write_bytes(self.pem)
        self.certificate = ssl.Certificate.loadPEM(self.pem)

    def listen(self, port=0):
        key = quoteStringArgument(str(self.key_path))
        cert = quoteStringArgument(str(self.cert_path))
        return f"ssl:port={port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"

    def client_options(self):
        return ssl.optionsForClientTLS("127.0.0.1", trustRoot=self.certificate)


# endregion
# region the worker under test


class Served:
    """
    One worker service listening on 127.0.0.1 (with TLS when C{tls} is a
    L{Cert}), and an HTTP client that trusts its certificate.
    """

    def __init__(self, tmp_path, name, args, tls=None):
        self.uuid = f"http_{name}"
        self.data = tmp_path / name / "data"
        self.files = self.data / "files"
        self.tls = tls
        listen = tls.listen() if tls else "tcp:port=0:interface=127.0.0.1"
        options = Options()
        options.parseOptions(
            ["--listen", listen, "--data-path", str(self.data), "--uuid", self.uuid, *args]
        )
        self.config_file = options.files.config
        self.service = makeService(options, reactor)
        self.settings = self.service.settings
        self.store = self.service.store
        self.stops = []
        self.service.worker.stop = lambda: self.stops.append(True)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.http = self.new_http()
        self.clients = []
        self.connections = set(_connections())
        self.port = None

    def new_http(self):
        """
        An HTTP client with a cookie jar of its own.
        """
        policy = BrowserLikePolicyForHTTPS(self.tls.certificate if self.tls else None)
        return HTTPClient(Agent(reactor, contextFactory=policy, pool=self.pool))

    @defer.inlineCallbacks
    def start(self):
        self.service.startService()
        listener = self.service.getServiceNamed("listener")
        yield listener.listened
        self.port = listener.port.getHost().port
        scheme = "https" if self.tls else "http"
        self.base = f"{scheme}://127.0.0.1:{self.port}"
        self.ws_base = f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}"
        return self

    def url(self, path):
        return self.base + path

    @defer.inlineCallbacks
    def connect(self, path="/", headers=None, listening=True):
        client = yield ws_connect(self, path, headers)
        self.clients.append(client)
        if listening:
            yield client.call("uuid")
        return client

    def endpoint(self, timeout=5, plain=False):
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=timeout)
        if self.tls and not plain:
            endpoint = wrapClientTLS(self.tls.client_options(), endpoint)
        return endpoint

    @defer.inlineCallbacks
    def stop(self):
        yield defer.gatherResults([c.close() for c in self.clients if not c.is_closed])
        yield self.pool.closeCachedConnections()
        if self.service.running:
            yield self.service.stopService()
        for _ in range(100):
            if not set(_connections()) - self.connections:
                break
            yield sleep(0.02)


def _connections():
    return [
        s
        for s in set(reactor.getReaders()) | set(reactor.getWriters())
        if isinstance(s, (tcp.Server, tcp.Client))
    ]


@pytest.fixture
def start(tmp_path, monkeypatch, clean_reactor):
    """
    C{yield start(*args, name=..., config={...}, tls=Cert)}: a listening
    L{Served} worker; C{config} is written to its worker config file first.
    """
    monkeypatch.setattr(persistence, "workers_dir", lambda: tmp_path / "workers")
    running = []

    def _start(*args, name="w", config=None, tls=None):
        if config is not None:
            path = tmp_path / "workers" / f"worker_http_{name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(config))
        worker = Served(tmp_path, name, args, tls)
        running.append(worker)
        return worker.start()

    yield _start
    for worker in reversed(running):
        pytest_twisted.blockon(worker.stop())


# endregion
# region clients


def ws_connect(served, path="/", headers=None, timeout=5):
    """
    An Autobahn client of L{wsclient} on C{path} (query included), with
    extra handshake C{headers}, over TLS when the worker speaks it.
    """
    factory = wsclient._Factory(served.ws_base + path, headers=headers or {})
    factory.setProtocolOptions(autoPingInterval=0, openHandshakeTimeout=timeout)
    factory.opened = opened = defer.Deferred()

    def failed(failure):
        if not opened.called:
            factory.opened = None
            opened.errback(failure)

    served.endpoint(timeout).connect(factory).addErrback(failed)
    return opened


class _Raw(Protocol):
    def __init__(self, request):
        self.request = request
        self.received = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received += data
        if b"\r\n\r\n" in self.received and not self.done.called:
            self.done.callback(self.received)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(self.received)


@defer.inlineCallbacks
def handshake(served, path="/", headers=None, plain=False):
    """
    Send a WebSocket opening handshake by hand; return the status code and
    the response headers (lower-cased names), without going on; C{(None,
    bytes received)} when the answer is no HTTP. C{plain}: without TLS.
    """
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{served.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    raw = _Raw(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    yield connectProtocol(served.endpoint(plain=plain), raw)
    response = yield raw.done
    if not response.startswith(b"HTTP/1.1 "):
        return None, response
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(head[0].split()[1]), fields


def multipart(name, content, boundary="inprocessBoundary42"):
    body = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


# endregion
# region test-only commands


def add_command(monkeypatch, function):
    """
    Register C{function} as a command for this test only.
    """
    cmd = commands.Command.of(function, False)
    monkeypatch.setitem(commands.COMMANDS, function.__name__, cmd)


def sleeper(monkeypatch):
    """
    C{test_sleep(seconds)}: waits on the reactor; the list returned records
    'done' or 'cancelled' for every call.
    """
    calls = []

    async def test_sleep(worker, seconds):
        try:
            await aio.as_future(task.deferLater(reactor, seconds, lambda: None))
        except BaseException:
            calls.append("cancelled")
            raise
        calls.append("done")
        return seconds

    add_command(monkeypatch, test_sleep)
    return calls


def recorder(monkeypatch):
    """
    C{test_record(value, quiet=False)}: appends C{value} to the list
    returned; returns it, or None when C{quiet}.
    """
    calls = []

    def test_record(worker, value=None, quiet=False):
        calls.append(value)
        return None if quiet else value

    add_command(monkeypatch, test_record)
    return calls


def texts(monkeypatch):
    """
    C{test_text(size)}: a result string of C{size} characters.
    """

    def test_text(worker, size):
        return "x" * size

    add_command(monkeypatch, test_text)


def failing(monkeypatch):
    def test_fail(worker):
        raise ValueError("deliberate failure")

    add_command(monkeypatch, test_fail)


# endregion
