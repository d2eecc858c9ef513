"""
A host Twisted application with a FuncNodes worker mounted at /fn/, beside
its own /hello: what docs/deployment.md describes, as a runnable program.

Usage: python tests/embedded_app.py PORT DATA_DIR WORKERS_DIR
"""

import sys

from funcnodes_tw import aio


def main(port, data, workers):
    reactor = aio.install_reactor()
    from twisted.application.service import MultiService
    from twisted.application.strports import service as listen
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.web.resource import Resource
    from twisted.web.server import Site
    from twisted.web.static import Data

    from funcnodes_tw.service import create

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    application = MultiService()
    root = Resource()
    root.putChild(b"hello", Data(b"host says hi", "text/plain"))

    fn = create("embedded", data_path=data, workers_dir=workers)
    fn.setServiceParent(application)
    root.putChild(b"fn", fn.resource)
    listen(f"tcp:{port}:interface=127.0.0.1", Site(root)).setServiceParent(application)

    application.startService()
    reactor.addSystemEventTrigger("before", "shutdown", application.stopService)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:4])
