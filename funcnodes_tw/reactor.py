"""
Twisted's asyncio reactor, its TLS support imported at the first TLS port.

Importing this module loads the reactor and the endpoints module without
pyOpenSSL (L{funcnodes_tw.tls}); C{ssl:} endpoints still work, through
L{AsyncioReactor.listenSSL}.
"""

from zope.interface import implementer

from funcnodes_tw import tls

from twisted.internet.interfaces import IReactorSSL


def _base():
    from twisted.internet import endpoints  # noqa: F401  (it imports TLS support too)
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    return AsyncioSelectorReactor


AsyncioSelectorReactor = tls.without(_base)


@implementer(IReactorSSL)
class AsyncioReactor(AsyncioSelectorReactor):
    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        return self.listenTCP(port, tls.wrap(contextFactory, False, factory), backlog, interface)

    def connectSSL(self, host, port, factory, contextFactory, timeout=30, bindAddress=None):
        wrapped = tls.wrap(contextFactory, True, factory)
        return self.connectTCP(host, port, wrapped, timeout, bindAddress)
