"""
The worker's HTTP face: one resource tree beside the WebSocket.

C{/} upgrades to the WebSocket, and sends a browser to the UI; C{/message/}
serves and accepts large messages; C{/static/} serves the funcnodes-react-flow
UI when it is installed, and C{/worker} tells that UI where to connect. The
tree can be mounted under any path of another Site: the UI derives every HTTP
URL from the WebSocket URL it was given.
"""

import importlib.util
import json
from pathlib import Path

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.web import resource, server, static
from twisted.web.server import NOT_DONE_YET

from funcnodes_tw import uploads
from funcnodes_tw.access import Cors, TokenGuard, split_token

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
        for value in request.args.get(b"token", []):
            _, path = split_token(value)
            if path:  # the UI's C{/?token=T/message/<id>}: serve C{/message/<id>}
                request.postpath = path.split(b"/")
                return resource.getChildForRequest(self.root, request).render(request)
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if upgrade == b"websocket" or self.ui is None or request.method != b"GET":
            return self.websocket.render(request)
        scheme = "wss" if request.isSecure() else "ws"
        address = request.getHost()
        host = (request.getHeader(b"host") or b"").decode("ascii", "replace")
        host = host or f"{address.host}:{address.port}"
        path = request.path.decode("ascii", "replace")
        request.redirect(f"static/index.html?worker_url={scheme}://{host}{path}".encode())
        return b""


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
        request.setHeader(b"content-length", b"%d" % _size(message))
        static.NoRangeStaticProducer(request, message).start()
        return NOT_DONE_YET


def _size(f):
    size = f.seek(0, 2)
    f.seek(0)
    return size


class Upload(resource.Resource):
    """
    C{POST /upload/}: multipart C{file} parts into the worker's C{files/}.

    The body was spooled to a temporary file by Twisted Web (see
    L{LimitedRequest}); it is parsed and written in a thread.
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
    if failure.check(uploads.TooLarge):
        return 413, "Upload too large", b"text/plain; charset=utf-8"
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


class LimitedRequest(server.Request):
    """
    A request whose body beyond C{site.max_body} bytes is discarded, not
    stored: the resource then answers 413 instead of buffering gigabytes.
    """

    too_large = False

    def gotLength(self, length):
        limit = getattr(self.channel.site, "max_body", None)
        if limit is not None and length is not None and length > limit:
            self.too_large = True
        super().gotLength(None if self.too_large else length)
        self._body_bytes = 0

    def handleContentChunk(self, data):
        limit = getattr(self.channel.site, "max_body", None)
        self._body_bytes += len(data)
        if limit is not None and self._body_bytes > limit:
            self.too_large = True
        if not self.too_large:
            super().handleContentChunk(data)


def make_site(resource, max_body=None):
    """
    One Site for the WebSocket and HTTP: bodies are not parsed into memory.
    """
    site = server.Site(resource, requestFactory=LimitedRequest, parsePOSTFormSubmission=False)
    site.max_body = max_body
    return site


def make_root(worker, factory, store, dispatcher, origins, token=None):
    """
    The worker's resource tree; with a C{token}, every request must carry it.
    """
    ui = ui_directory()
    root = resource.Resource()
    root.putChild(b"", Front(WebSocketResource(factory), ui, root))
    root.putChild(b"message", Cors(Message(store, dispatcher), origins))
    root.putChild(b"worker", WorkerInfo(worker))
    root.putChild(b"upload", Cors(Upload(worker), origins, b"POST, OPTIONS"))
    if ui is not None:
        root.putChild(b"static", ui_resource(ui))
    return TokenGuard(root, token) if token else root

