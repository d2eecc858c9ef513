"""
Who may talk to the worker: web pages by origin, and anyone by token.

Browsers send an C{Origin} header with WebSocket handshakes and cross-site
HTTP requests; without a check, any page a user visits could drive a local
worker (PROTOCOL.md 14.2). The allow-list comes from the worker config
(C{allowed_origins}) or C{--allow-origin}; by default a worker bound to a
loopback address accepts pages from loopback origins, and a worker bound
elsewhere accepts none but its own. C{*} allows every origin, and only
when configured explicitly.
"""

import hashlib
import hmac
import ipaddress
import re
from urllib.parse import parse_qs, urlsplit

from twisted.logger import Logger, LogLevel
from twisted.web import resource
from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IAccessLogFormatter
from zope.interface import provider

_log = Logger()

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host):
    if host is None:
        return False
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OriginPolicy:
    def __init__(self, allowed=None, bound_host=None):
        """
        @param allowed: explicit origins (C{scheme://host[:port]}), or None
            for the default that depends on C{bound_host}.
        """
        self.allowed = None if allowed is None else {o.rstrip("/").lower() for o in allowed}
        self.bound_host = bound_host

    def allows(self, origin, own_host=None):
        """
        Whether a page from C{origin} may use the worker reached as C{own_host}
        (the C{Host} header: a page the worker served itself is always fine).
        """
        if not origin:
            return True  # not a browser page: the manager, the CLI, scripts
        origin = origin.rstrip("/").lower()
        parts = urlsplit(origin)
        if own_host and parts.netloc == own_host.lower():
            return True
        if self.allowed is not None:
            return "*" in self.allowed or origin in self.allowed
        return is_loopback(self.bound_host) and is_loopback(parts.hostname)


def _header(request, name):
    value = request.getHeader(name)
    return value.decode("latin-1") if isinstance(value, bytes) else value


class Cors(resource.Resource):
    """
    Wrap a resource (and its children) with CORS headers for allowed origins
    and answer preflight C{OPTIONS} requests the way the UI needs them.
    """

    def __init__(self, wrapped, policy, methods=b"GET, POST, OPTIONS"):
        super().__init__()
        self.wrapped = wrapped
        self.policy = policy
        self.methods = methods

    @property
    def isLeaf(self):
        return self.wrapped.isLeaf

    def getChildWithDefault(self, path, request):
        return Cors(self.wrapped.getChildWithDefault(path, request), self.policy, self.methods)

    def render(self, request):
        origin = _header(request, b"origin")
        allowed = self.policy.allows(origin, _header(request, b"host"))
        if origin and allowed:
            request.setHeader(b"access-control-allow-origin", origin.encode("latin-1"))
            request.setHeader(b"access-control-allow-credentials", b"true")
            request.setHeader(b"vary", b"Origin")
        if request.method == b"OPTIONS":
            if not (origin and allowed):
                request.setResponseCode(403)
                return b""
            request.setResponseCode(204)
            request.setHeader(b"access-control-allow-methods", self.methods)
            asked = request.getHeader(b"access-control-request-headers")
            if asked:
                request.setHeader(b"access-control-allow-headers", asked)
            request.setHeader(b"access-control-max-age", b"600")
            return b""
        if origin and not allowed:
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Origin not allowed"
        return self.wrapped.render(request)


def cookie_name(worker_id):
    """
    The token cookie of one worker. Browsers keep cookies per host, not per
    port or mount path: a name shared by all workers would let two workers on
    one host overwrite each other's.
    """
    return b"funcnodes_token_" + re.sub(r"[^A-Za-z0-9_-]", "_", worker_id).encode("ascii")


def presented_tokens(request, cookie, args=None):
    """
    Tokens a request carries: C{?token=} (up to a C{/}, see L{split_token};
    from C{args} while the request's own are not parsed yet),
    C{Authorization: Bearer}, or the C{cookie} set when a C{?token=} was
    accepted.
    """
    args = request.args if args is None else args
    tokens = [split_token(value)[0] for value in args.get(b"token", [])]
    authorization = request.getHeader(b"authorization") or b""
    scheme, _, credentials = authorization.partition(b" ")
    if scheme.lower() == b"bearer":
        tokens.append(credentials.strip())
    value = request.getCookie(cookie)
    if value:
        tokens.append(value)
    return tokens


def split_token(value):
    """
    The UI appends its HTTP paths to the worker URL it was given, query and
    all: with C{ws://host/?token=T} it asks for C{/?token=T/message/<id>}.
    Split such a value into the token and the path meant.
    """
    token, _, path = value.partition(b"/")
    return token, path


def _same(a, b):
    """
    Constant-time comparison that does not reveal the token's length either.
    """
    return hmac.compare_digest(hashlib.sha256(a).digest(), hashlib.sha256(b).digest())


class TokenGuard(resource.Resource):
    """
    Refuse (401) every request, WebSocket handshakes included, that does not
    carry the worker's token; remember a C{?token=} in a cookie scoped to
    this worker (its own name, the path it is mounted at) so that the UI's
    page, scripts and requests need no token in their URLs.
    """

    #: A refusal is a warning once per (peer, reason), then debug: a FuncNodes
    #: manager probing every 10 s would flood C{worker.log}. Peers remembered:
    MAX_WARNED = 256

    def __init__(self, wrapped, token, worker_id):
        super().__init__()
        self.wrapped = wrapped
        self.token = token.encode("utf-8")
        self.cookie = cookie_name(worker_id)
        self._warned = set()

    def _allowed(self, request, mount):
        presented = presented_tokens(request, self.cookie)
        if not self._carried(presented):
            self._refused(request, "a wrong token" if presented else "no token")
            return False
        cookie = request.getCookie(self.cookie)
        if request.args.get(b"token") and not (cookie and _same(cookie, self.token)):
            self._remember(request, mount)
        return True

    def admits_body(self, request, uri):
        """
        Whether a request whose body is still to come carries the token,
        judged from its request line (C{uri}) and headers: the body of one
        that does not is not stored (its answer is 401 all the same), so
        strangers cannot fill the disk with uploads up to the size limit.
        """
        request.parseCookies()
        args = parse_qs(uri.partition(b"?")[2])
        return self._carried(presented_tokens(request, self.cookie, args))

    def _carried(self, presented):
        return any(_same(t, self.token) for t in presented)

    def _remember(self, request, mount):
        """
        Set the cookie for the path the worker is mounted at (C{mount}: its
        segments), so that workers mounted side by side keep theirs apart.
        """
        request.addCookie(
            self.cookie,
            self.token,
            path=b"/" + b"".join(part + b"/" for part in mount),
            httpOnly=True,
            sameSite="strict",
            secure=request.isSecure(),
        )

    def _refused(self, request, reason):
        peer = getattr(request.getClientAddress(), "host", "-")
        if len(self._warned) >= self.MAX_WARNED:
            self._warned.clear()
        level = LogLevel.debug if (peer, reason) in self._warned else LogLevel.warn
        self._warned.add((peer, reason))
        _log.emit(
            level,
            "Refused {method} {path} from {peer}: {reason} (401)",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            peer=peer,
            reason=reason,
        )

    def getChildWithDefault(self, path, request):
        if not self._allowed(request, request.prepath[:-1]):
            return _Unauthorized()
        return self.wrapped.getChildWithDefault(path, request)

    def render(self, request):
        if not self._allowed(request, request.prepath):
            return _Unauthorized().render(request)
        return self.wrapped.render(request)


class _Unauthorized(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(401)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"www-authenticate", b'Bearer realm="funcnodes"')
        return b"A valid token is required"


#: A token's value in a logged URI or referrer: C{?token=T}, the UI's
#: C{?token=T/message/<id>}, and C{worker_url=ws%3A...%3Ftoken%3DT}.
_TOKEN_IN_URL = re.compile(
    r"(?P<plain>token=)[^&\"\s/]*|(?P<quoted>token%3D)(?:(?!%2F|%26)[^&\"\s/])*",
    re.IGNORECASE,
)


def redact(text):
    return _TOKEN_IN_URL.sub(lambda m: (m["plain"] or m["quoted"]) + "<redacted>", text)


@provider(IAccessLogFormatter)
def access_log(timestamp, request):
    """
    Twisted Web's combined access log line, without tokens.
    """
    return redact(combinedLogFormatter(timestamp, request))
