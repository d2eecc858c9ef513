"""
Twisted's TLS support, loaded when a TLS port needs it and not before.

With pyOpenSSL installed (C{twisted[tls]}), Twisted's reactor and its
endpoints module import it, and cryptography with it, when they load: about
6 MB resident for TLS that most workers never speak. While L{hidden}, those
modules load as if pyOpenSSL were missing; L{funcnodes_tw.reactor} then
wraps TLS ports itself, and L{load} gives the endpoints module its TLS names
back (for C{tls:} descriptions and TLS clients such as C{treq}). What stays
without TLS: C{startTLS} on plain TCP connections, and Autobahn's transport
details (C{is_secure}, channel id) on C{wss} connections; the worker uses
neither.
"""

import importlib
import importlib.util
import sys
from contextlib import contextmanager

from twisted.logger import Logger

_log = Logger()

#: Endpoint types that never speak TLS: no need to load it for them.
PLAIN = frozenset({"tcp", "tcp6", "unix", "systemd", "stdio"})


class _Hide:
    """
    A module finder that refuses pyOpenSSL.
    """

    def find_spec(self, name, path=None, target=None):
        if name == "OpenSSL" or name.startswith("OpenSSL."):
            raise ModuleNotFoundError(f"{name} is loaded only for TLS ports", name=name)
        return None


@contextmanager
def hidden():
    """
    Import Twisted modules inside this block without their TLS support.
    """
    if "OpenSSL" in sys.modules:
        yield
        return
    finder = _Hide()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def without(load):
    """
    C{load()} (imports) inside L{hidden}. Should a newer Twisted or Autobahn
    need pyOpenSSL to import at all, C{load} runs again with it (the failed
    modules are gone from C{sys.modules}): an upgrade costs memory, never
    the start.
    """
    try:
        with hidden():
            return load()
    except ImportError as exc:
        if not (exc.name or "").partition(".")[0] == "OpenSSL":
            raise
        _log.warn(
            "TLS support is loaded at start: {error} (a library now needs pyOpenSSL "
            "on import; the worker uses a few MB more memory)",
            error=exc,
        )
        return load()


def load():
    """
    Load Twisted's TLS support now: the endpoints module, if it was loaded
    without it, runs again in place, so its TLS names exist for everyone
    holding it or its functions (C{wrapClientTLS}, the C{tls:} parser).
    """
    from twisted.internet import endpoints

    if (
        getattr(endpoints, "TLSMemoryBIOFactory", None) is None
        and importlib.util.find_spec("OpenSSL") is not None
    ):
        importlib.reload(endpoints)


def server_from_string(reactor, description):
    """
    Twisted's C{serverFromString}, with TLS support loaded first unless the
    description is a plain port.
    """
    from twisted.internet import endpoints

    if description.split(":", 1)[0].strip().lower() not in PLAIN:
        load()
    return endpoints.serverFromString(reactor, description)


def wrap(context_factory, is_client, factory):
    """
    C{factory} speaking TLS (what Twisted's own C{listenSSL} does).
    """
    from twisted.protocols.tls import TLSMemoryBIOFactory

    return TLSMemoryBIOFactory(context_factory, is_client, factory)
