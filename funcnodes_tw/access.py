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

import hmac
import ipaddress
from urllib.parse import urlsplit

from twisted.web import resource

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


TOKEN_COOKIE = b"funcnodes_token"


def presented_tokens(request):
    """
    Tokens a request carries: C{?token=} (up to a C{/}, see L{split_token}),
    C{Authorization: Bearer}, or the cookie set when a C{?token=} was accepted.
    """
    tokens = [split_token(value)[0] for value in request.args.get(b"token", [])]
    authorization = request.getHeader(b"authorization") or b""
    scheme, _, credentials = authorization.partition(b" ")
    if scheme.lower() == b"bearer":
        tokens.append(credentials.strip())
    cookie = request.getCookie(TOKEN_COOKIE)
    if cookie:
        tokens.append(cookie)
    return tokens


def split_token(value):
    """
    The UI appends its HTTP paths to the worker URL it was given, query and
    all: with C{ws://host/?token=T} it asks for C{/?token=T/message/<id>}.
    Split such a value into the token and the path meant.
    """
    token, _, path = value.partition(b"/")
    return token, path


class TokenGuard(resource.Resource):
    """
    Refuse (401) every request, WebSocket handshakes included, that does not
    carry the worker's token.
    """

    def __init__(self, wrapped, token):
        super().__init__()
        self.wrapped = wrapped
        self.token = token.encode("utf-8")

    def _allowed(self, request):
        if not any(hmac.compare_digest(t, self.token) for t in presented_tokens(request)):
            return False
        if request.args.get(b"token") and request.getCookie(TOKEN_COOKIE) != self.token:
            request.addCookie(
                TOKEN_COOKIE, self.token, path=b"/", httpOnly=True, sameSite="strict"
            )
        return True

    def getChildWithDefault(self, path, request):
        if not self._allowed(request):
            return _Unauthorized()
        return self.wrapped.getChildWithDefault(path, request)

    def render(self, request):
        if not self._allowed(request):
            return _Unauthorized().render(request)
        return self.wrapped.render(request)


class _Unauthorized(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(401)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"www-authenticate", b'Bearer realm="funcnodes"')
        return b"A valid token is required"
