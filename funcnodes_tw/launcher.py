"""
C{funcnodes-tw}: run one worker in the foreground, logging to stdout.

The same options and service as C{twistd -n funcnodes-worker}, without
twistd's daemon machinery; the asyncio reactor is installed first.
"""

import sys

from funcnodes_tw import aio


def main(argv=None):
    reactor = aio.install_reactor()
    from twisted.application.service import IService
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.python import usage

    from funcnodes_tw.logs import LEVELS, filtered
    from funcnodes_tw.tap import Options, makeService

    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as exc:
        sys.stderr.write(f"Usage: funcnodes-tw {options}\nfuncnodes-tw: {exc}\n")
        return 2

    stdout = filtered(textFileLogObserver(sys.stdout), LEVELS[options.settings.log_level])
    globalLogBeginner.beginLoggingTo([stdout], redirectStandardIO=False)
    service = IService(makeService(options, reactor))
    try:
        service.startService()
    except Exception as exc:
        sys.stderr.write(f"funcnodes-tw: {exc}\n")
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return getattr(service, "exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
