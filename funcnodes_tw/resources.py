"""
The worker's HTTP face: one resource tree beside the WebSocket.

C{/} upgrades to the WebSocket, and sends a browser to the UI; C{/message/}
serves and accepts large messages; C{/static/} serves the funcnodes-react-flow
UI when it is installed, and C{/worker} tells that UI where to connect. The
tree can be mounted under any path of another Site: the UI derives every HTTP
URL from the WebSocket URL it was given.
"""

import importlib.util
import io
import json
from pathlib import Path
from urllib.parse import parse_qs, quote

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.interfaces import IPullProducer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.web import resource, server, static
from twisted.web.http import HTTPChannel, datetimeToLogString
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from funcnodes_tw import uploads, wire
from funcnodes_tw.access import Cors, TokenGuard, access_log, split_token
from funcnodes_tw.internals import Internals

_log = Logger()


def _text(request, code, text, content_type=b"text/plain; charset=utf-8"):
    request.setResponseCode(code)
    request.setHeader(b"content-type", content_type)
    return text.encode("utf-8") if isinstance(text, str) else text


class Front(resource.Resource):
    """
    C{/}: the WebSocket for clients; a redirect to the UI for a browser.
    """

    isLeaf = True

    def __init__(self, websocket, ui, root):
        super().__init__()
        self.websocket = websocket
        self.ui = ui
        self.root = root

    def render(self, request):
        tokens = request.args.get(b"token", [])
        for value in tokens:
            _, path = split_token(value)
            if path:  # the UI's C{/?token=T/message/<id>}: serve C{/message/<id>}
                request.postpath = path.split(b"/")
                return resource.getChildForRequest(self.root, request).render(request)
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade == b"websocket" or self.ui is None or request.method != b"GET":
            return self.websocket.render(request)
        token = tokens[0].decode("ascii", "replace") if tokens else None
        request.redirect(ui_url(worker_url(request, token), token).encode("ascii"))
        return b""


def ui_url(worker, token=None):
    """
    Where to send a browser: the UI, told to connect to C{worker}. A token
    that came in the browser's URL goes on in the page's URL as well: after
    a link from another site the browser holds back the SameSite=Strict
    cookie for the page, though not for what the page then loads itself.
    """
    query = f"worker_url={quote(worker, safe=':/[]@')}"
    if token:
        query = f"token={quote(token, safe='')}&{query}"
    return f"static/index.html?{query}"


def worker_url(request, token=None):
    """
    The WebSocket URL the browser reached us at. With the C{token} it brought
    in its URL: the UI derives its HTTP URLs from this one, and a token in
    them works where the cookie does not reach (a UI served elsewhere).
    """
    scheme = "wss" if request.isSecure() else "ws"
    address = request.getHost()
    host = (request.getHeader(b"host") or b"").decode("ascii", "replace")
    host = host or f"{address.host}:{address.port}"
    url = f"{scheme}://{host}{request.path.decode('ascii', 'replace')}"
    return f"{url}?token={token}" if token else url


class Message(resource.Resource):
    """
    C{GET /message/<id>} returns a parked large message; C{POST /message/}
    runs a command too big for a frame (its reply goes out over WebSocket).
    """

    def __init__(self, store, dispatcher):
        super().__init__()
        self.store = store
        self.dispatcher = dispatcher

    def getChild(self, path, request):
        if path == b"":
            return self
        return _StoredMessage(self.store, path.decode("ascii", "replace"))

    def render_GET(self, request):
        return _text(request, 404, "Message not found")

    def render_POST(self, request):
        if getattr(request, "too_large", False):
            return _text(request, 413, "Message too large")
        try:
            message = self.dispatcher.parse(None, request.content.read())
        except Exception:
            message = None
        if message is None:
            return _text(request, 400, "Error processing message")
        d = self.dispatcher.run(None, message)
        if d is None:
            return _text(request, 200, "Message received")

        def done(_):
            request.write(_text(request, 200, "Message received"))
            request.finish()

        d.addBoth(done)
        return NOT_DONE_YET


class _StoredMessage(resource.Resource):
    isLeaf = True

    def __init__(self, store, msgid):
        super().__init__()
        self.store = store
        self.msgid = msgid

    def render_GET(self, request):
        message = self.store.open(self.msgid)
        if message is None:
            return _text(request, 404, "Message not found")
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % message.size)
        _big_writes(request.channel.transport)
        request.registerProducer(_ChunkProducer(request, message.chunks()), False)
        return NOT_DONE_YET


def _big_writes(transport):
    """
    Let a TCP connection send a whole chunk per system call instead of
    128 KiB: a fifth less CPU for a 27 MB body.
    """
    if getattr(transport, "SEND_LIMIT", wire.CHUNK) < wire.CHUNK:
        transport.SEND_LIMIT = wire.CHUNK


@implementer(IPullProducer)
class _ChunkProducer:
    """
    Writes a stored message a chunk at a time, each when the last was sent:
    the base64 of a parked message exists only one chunk at a time.
    """

    def __init__(self, request, chunks):
        self.request = request
        self.chunks = chunks

    def resumeProducing(self):
        if self.request is None:
            return
        chunk = next(self.chunks, None)
        if chunk is not None:
            self.request.write(chunk)
            return
        self.request.unregisterProducer()
        self.request.finish()
        self.stopProducing()

    def stopProducing(self):
        self.chunks.close()
        self.request = None


class Upload(resource.Resource):
    """
    C{POST /upload/}: multipart C{file} parts into the worker's C{files/}.

    On our Site the body was parsed into a staging folder as it arrived (see
    L{LimitedRequest}); only the renames are left. Elsewhere it is parsed
    from the stored body in a thread.
    """

    isLeaf = True

    def __init__(self, worker):
        super().__init__()
        self.worker = worker

    def render_POST(self, request):
        if getattr(request, "too_large", False):
            return _text(request, 413, "Upload too large")
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
        if not content_type.lower().startswith("multipart/form-data"):
            return _text(request, 400, "Expected multipart/form-data")
        streamed = getattr(request, "take_upload", lambda: None)()
        if streamed is not None:
            d = deferToThread(streamed.commit)
        else:
            request.content.seek(0)
            d = deferToThread(
                uploads.store_multipart, request.content, content_type, self.worker.files.files
            )
        d.addCallbacks(_upload_reply, _upload_error, errbackArgs=())
        d.addCallback(lambda reply: _finish(request, *reply))
        return NOT_DONE_YET


def _upload_reply(paths):
    if not paths:
        return 400, "No files uploaded", b"text/plain; charset=utf-8"
    body = json.dumps({"file": uploads.common_path(paths)})
    return 200, body, b"application/json"


def _upload_error(failure):
    if failure.check(uploads.BadFilename):
        return 400, str(failure.value), b"text/plain; charset=utf-8"
    _log.failure("Upload failed", failure)
    return 500, "Error processing folder upload", b"text/plain; charset=utf-8"


def _finish(request, code, text, content_type):
    if not request.finished and not request._disconnected:
        request.write(_text(request, code, text, content_type))
        request.finish()


class WorkerInfo(resource.Resource):
    """
    Where to connect: the host the browser used, and our port.
    """

    isLeaf = True

    def __init__(self, worker):
        super().__init__()
        self.worker = worker

    def render_GET(self, request):
        host = request.getRequestHostname().decode("ascii", "replace")
        info = {"host": host, "port": request.getHost().port, "ssl": request.isSecure()}
        info.update(uuid=self.worker.uuid, name=self.worker.display_name())
        return _text(request, 200, json.dumps(info), b"application/json")


class Metrics(resource.Resource):
    """
    C{GET /metrics}: the Prometheus exposition of the worker's metrics.
    """

    isLeaf = True

    def __init__(self, exposition):
        super().__init__()
        self.exposition = exposition

    def render_GET(self, request):
        body, content_type = self.exposition.render()
        return _text(request, 200, body, content_type.encode("ascii"))


class Health(resource.Resource):
    """
    C{GET /health}: 200 while the worker runs and its reactor turns, else
    503; for load balancers and C{curl}, so it needs no token.
    """

    isLeaf = True

    def __init__(self, health):
        super().__init__()
        self.health = health

    def render_GET(self, request):
        healthy, body = self.health()
        request.setHeader(b"cache-control", b"no-store")
        return _text(request, 200 if healthy else 503, json.dumps(body), b"application/json")


class _Beside(resource.Resource):
    """
    A few open children beside a tree (which may be token-guarded).
    """

    def __init__(self, tree, children):
        super().__init__()
        self.tree = tree
        self.open = children

    def getChildWithDefault(self, path, request):
        child = self.open.get(path)
        if child is not None:
            return child
        return self.tree.getChildWithDefault(path, request)

    def render(self, request):
        return self.tree.render(request)

    @property
    def admits_body(self):
        """
        The tree's guard decides which bodies are stored (L{LimitedRequest}).
        """
        return getattr(self.tree, "admits_body", None)


def ui_directory():
    """
    The installed funcnodes-react-flow UI, or None.
    """
    spec = importlib.util.find_spec("funcnodes_react_flow")  # importing it costs 0.3 s
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if folder.is_dir() else None


def ui_resource(folder):
    """
    The UI's files. Its C{index.html} loads the bundle from C{/static/}; served
    here it loads it relative to itself, so the UI also works when the worker
    is mounted under a prefix of another site.
    """
    ui = static.File(str(folder))
    html = (folder / "index.html").read_bytes().replace(b'"/static/', b'"./')
    ui.putChild(b"index.html", static.Data(html, "text/html; charset=utf-8"))
    return ui


#: Staged bytes removed without a thread hop: about 2 ms to unlink.
DISCARD_AT_ONCE = 16 * 2**20
#: The request line, which HTTPChannel keeps to itself until the body has come.
_REQUEST_LINE = Internals(
    "Twisted Web's HTTPChannel",
    ["_command", "_path"],
    "request bodies are stored before the token is checked, and uploads parsed once stored",
)


class LimitedRequest(server.Request):
    """
    A request whose body beyond C{site.max_body} bytes is discarded, not
    stored: the resource then answers 413 instead of buffering gigabytes.

    A multipart C{POST} to C{upload/} is parsed as it arrives into staging
    beside C{site.upload_folder} instead of being stored (L{take_upload}):
    each file is written once. Whatever no resource took is discarded, and
    so is the body of a request without the worker's token.
    """

    too_large = False
    _upload = None
    _discarding = False

    def gotLength(self, length):
        limit = getattr(self.channel.site, "max_body", None)
        if limit is not None and length is not None and length > limit:
            self.too_large = True
        self._discarding = self.too_large or not self._admitted()
        self._body_bytes = 0
        self._upload = None if self._discarding else self._start_upload()
        if self._upload is None:
            super().gotLength(None if self._discarding else length)
        else:
            self.content = io.BytesIO()

    def _admitted(self):
        """
        Whether the site's token guard, if it has one, lets this body in.
        """
        admits = getattr(self.channel.site.resource, "admits_body", None)
        line = self._request_line()
        # Without the request line the guard judges the whole request later.
        return admits is None or line is None or admits(self, line[1])

    def _request_line(self):
        """
        (method, URI) while the body is still to come, or None where the
        channel does not tell (H2 streams, or a Twisted that renamed them).
        """
        channel = self.channel
        if isinstance(channel, HTTPChannel) and _REQUEST_LINE.usable(channel):
            return channel._command, channel._path
        return None

    def _start_upload(self):
        folder = getattr(self.channel.site, "upload_folder", None)
        content_type = self.getHeader(b"content-type") or b""
        if folder is None or not content_type.lower().startswith(b"multipart/form-data"):
            return None
        # The request line is not parsed into the request until the whole
        # body has come; HTTPChannel keeps it.
        line = self._request_line()
        if line is None or line[0] != b"POST" or not is_upload_uri(line[1]):
            return None
        try:
            return uploads.MultipartUpload(content_type.decode("latin-1"), folder)
        except Exception:  # no boundary: the stored body meets the same error
            return None

    def handleContentChunk(self, data):
        limit = getattr(self.channel.site, "max_body", None)
        self._body_bytes += len(data)
        if limit is not None and self._body_bytes > limit and not self.too_large:
            self.too_large = self._discarding = True
            self._drop_upload()
        if self._discarding:
            return
        if self._upload is not None:
            self._upload.feed(data)
        else:
            super().handleContentChunk(data)

    def take_upload(self):
        """
        The body parsed into staging, now the caller's to commit; or None.
        """
        upload, self._upload = self._upload, None
        return upload

    def _drop_upload(self):
        """
        Remove what was staged: at once, so that a refusal's reply finds it
        gone; in a thread when it is big (unlinking 1 GB takes ~80 ms).
        """
        upload = self.take_upload()
        if upload is None:
            return
        if self._body_bytes > DISCARD_AT_ONCE:
            deferToThread(upload.discard)
        else:
            upload.discard()

    def requestReceived(self, command, path, version):
        super().requestReceived(command, path, version)
        self._drop_upload()  # rendering is over; no resource took it

    def connectionLost(self, reason):
        self._drop_upload()
        super().connectionLost(reason)


def is_upload_uri(uri):
    """
    Whether a request URI names C{upload/}: as a path, or after a token the
    way the UI builds it (C{/?token=T/upload/}, see L{split_token}).
    """
    path, _, query = uri.partition(b"?")
    paths = [path.lstrip(b"/")]
    paths += [split_token(value)[1] for value in parse_qs(query).get(b"token", [])]
    return any(p.split(b"/")[0] == b"upload" for p in paths)


class Site(server.Site):
    """
    Twisted's Site, minus its once-a-second timer: it keeps the date of
    access-log lines fresh even with nobody asking, which woke an idle
    worker every second. The date is taken when a line is written.
    """

    def _updateLogDateTime(self):
        self._logDateTime = datetimeToLogString(self.reactor.seconds())

    def log(self, request):
        self._updateLogDateTime()
        super().log(request)


def make_site(resource, max_body=None, upload_folder=None):
    """
    One Site for the WebSocket and HTTP: bodies are not parsed into memory.
    With an C{upload_folder} (the C{files/} the tree's L{Upload} writes to),
    uploads are parsed into it as they arrive.
    """
    site = Site(
        resource,
        requestFactory=LimitedRequest,
        parsePOSTFormSubmission=False,
        logFormatter=access_log,
    )
    site.max_body = max_body
    site.upload_folder = upload_folder
    return site


def make_root(
    worker, factory, store, dispatcher, origins, token=None, health=None, exposition=None
):
    """
    The worker's resource tree; with a C{token}, every request must carry
    it, except C{/health}.

    @param health: what L{Health} answers (None: no C{/health}).
    @param exposition: a L{funcnodes_tw.metrics.Exposition} for C{/metrics}.
    """
    ui = ui_directory()
    root = resource.Resource()
    if exposition is not None:
        root.putChild(b"metrics", Metrics(exposition))
    root.putChild(b"", Front(WebSocketResource(factory), ui, root))
    root.putChild(b"message", Cors(Message(store, dispatcher), origins))
    root.putChild(b"worker", WorkerInfo(worker))
    root.putChild(b"upload", Cors(Upload(worker), origins, b"POST, OPTIONS"))
    if ui is not None:
        root.putChild(b"static", ui_resource(ui))
    if token:
        root = TokenGuard(root, token, worker.uuid)
    return root if health is None else _Beside(root, {b"health": Health(health)})

