"""
C{POST /upload/} on our Site: the multipart body is parsed as it arrives, each
file written once into staging and renamed into place at the end.

Driven byte by byte through a real L{HTTPChannel} over a L{StringTransport},
with the thread hops run inline, so each test sees the disk between chunks.
The same routes over real sockets are in C{test_http.py}.
"""

from types import SimpleNamespace

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.web import http, resource

from funcnodes_tw import resources
from funcnodes_tw.resources import Upload, is_upload_uri, make_site

LIMIT = 100_000
BOUNDARY = b"b0undary"


def multipart(parts):
    body = b""
    for name, content in parts:
        body += (
            b"--" + BOUNDARY + b"\r\n"
            b'Content-Disposition: form-data; name="file"; filename="' + name + b'"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
        )
    return body + b"--" + BOUNDARY + b"--\r\n"


class Echo(resource.Resource):
    isLeaf = True

    def render_POST(self, request):
        return request.content.read()


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "data" / "files"
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def threads(monkeypatch):
    """
    The names of the functions sent to a thread; each runs inline.
    """
    names = []

    def run(f, *args):
        names.append(f.__name__)
        return defer.maybeDeferred(f, *args)

    monkeypatch.setattr(resources, "deferToThread", run)
    return names


@pytest.fixture
def connect(files, threads):
    """
    A client connection to a Site that streams uploads into C{files}.
    """
    root = resource.Resource()
    root.putChild(b"upload", Upload(SimpleNamespace(files=SimpleNamespace(files=files))))
    root.putChild(b"echo", Echo())
    site = make_site(root, LIMIT, files)
    site.reactor = task.Clock()

    def connect():
        channel, transport = site.buildProtocol(None), StringTransport()
        channel.makeConnection(transport)
        channel.sent = transport.value  # what the client received
        return channel

    return connect


def head(path, length=None):
    framing = b"content-length: %d" % length if length is not None else b"transfer-encoding: chunked"
    return (
        b"POST " + path + b" HTTP/1.1\r\nhost: x\r\n" + framing + b"\r\n"
        b"content-type: multipart/form-data; boundary=" + BOUNDARY + b"\r\n\r\n"
    )


def staged(files):
    """
    Every file in the staging folders beside C{files/}, with its content.
    """
    return {
        p.relative_to(files.parent).as_posix(): p.read_bytes()
        for p in files.parent.glob(".upload-*/**/*")
        if p.is_file()
    }


def response(channel):
    """
    The status line and body of the reply (a deferred reply comes chunked).
    """
    headers, _, body = channel.sent().partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in headers.lower():
        chunks = []
        while body:
            chunk, body = http.fromChunk(body)
            chunks.append(chunk)
        body = b"".join(chunks)
    return headers.split(b"\r\n")[0], body


def test_a_file_is_written_while_its_body_arrives(connect, files):
    content = bytes(range(256)) * 200
    body = multipart([(b"dir/big.bin", content)])
    channel = connect()
    half = len(body) // 2
    channel.dataReceived(head(b"/upload/", len(body)) + body[:half])
    [(name, written)] = staged(files).items()
    assert 0 < len(written) < len(content) and content.startswith(written)
    assert list(files.iterdir()) == []

    channel.dataReceived(body[half:])
    assert response(channel) == (b"HTTP/1.1 200 OK", b'{"file": "dir/big.bin"}')
    assert (files / "dir" / "big.bin").read_bytes() == content
    assert [p.name for p in files.parent.iterdir()] == ["files"]


def test_a_client_that_leaves_midway_leaves_nothing(connect, files):
    body = multipart([(b"done.txt", b"complete part"), (b"cut.bin", b"x" * 20_000)])
    channel = connect()
    channel.dataReceived(head(b"/upload/", len(body)) + body[: len(body) - 5000])
    assert set(staged(files).values()) >= {b"complete part"}

    channel.connectionLost(None)
    assert [p.name for p in files.parent.iterdir()] == ["files"]
    assert list(files.iterdir()) == []


@pytest.mark.parametrize("big", [False, True])
def test_passing_the_limit_midway_drops_the_staged_files_at_once(
    connect, files, threads, monkeypatch, big
):
    if big:
        monkeypatch.setattr(resources, "DISCARD_AT_ONCE", LIMIT // 2)
    body = multipart([(b"big.bin", b"x" * (2 * LIMIT))])
    channel = connect()
    channel.dataReceived(head(b"/upload/"))
    channel.dataReceived(b"%x\r\n%s\r\n" % (LIMIT // 2, body[: LIMIT // 2]))
    assert staged(files) != {}
    channel.dataReceived(b"%x\r\n%s\r\n" % (LIMIT, body[LIMIT // 2 : LIMIT * 3 // 2]))
    assert [p.name for p in files.parent.iterdir()] == ["files"]
    assert threads == (["discard"] if big else [])

    rest = body[LIMIT * 3 // 2 :]
    channel.dataReceived(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))
    assert response(channel) == (b"HTTP/1.1 413 Request Entity Too Large", b"Upload too large")
    assert [p.name for p in files.parent.iterdir()] == ["files"]


def test_a_bad_name_after_a_good_part_lands_nothing(connect, files):
    body = multipart([(b"good.txt", b"fine"), (b"../evil.txt", b"evil")])
    channel = connect()
    channel.dataReceived(head(b"/upload/", len(body)) + body)
    status, text = response(channel)
    assert status == b"HTTP/1.1 400 Bad Request" and b"relative subpath" in text
    assert [p.name for p in files.parent.iterdir()] == ["files"]
    assert list(files.iterdir()) == []


def test_other_routes_keep_their_multipart_body(connect, files):
    body = multipart([(b"not-an-upload.txt", b"data")])
    channel = connect()
    channel.dataReceived(head(b"/echo", len(body)) + body[:10])
    assert [p.name for p in files.parent.iterdir()] == ["files"]
    channel.dataReceived(body[10:])
    assert response(channel) == (b"HTTP/1.1 200 OK", body)
    assert [p.name for p in files.parent.iterdir()] == ["files"]


def test_an_upload_no_resource_took_is_dropped(connect, files):
    body = multipart([(b"x.txt", b"data")])
    root = resource.Resource()  # /upload/ is not found here
    channel = connect()
    channel.site.resource = root
    channel.dataReceived(head(b"/upload/", len(body)) + body)
    assert response(channel)[0] == b"HTTP/1.1 404 Not Found"
    assert [p.name for p in files.parent.iterdir()] == ["files"]


@pytest.mark.parametrize(
    "uri, expected",
    [
        (b"/upload/", True),
        (b"/upload", True),
        (b"/upload/?x=1", True),
        (b"/?token=T/upload/", True),
        (b"/?a=b&token=T%2Fupload%2F", True),
        (b"/message/", False),
        (b"/uploads/", False),
        (b"/fn/upload/", False),
        (b"/?token=T/message/1", False),
        (b"/?token=T", False),
    ],
)
def test_which_requests_are_uploads(uri, expected):
    assert is_upload_uri(uri) is expected

