"""
C{funcnodes-tw}: run one worker in the foreground, logging to stdout.

The same options and service as C{twistd -n funcnodes-worker}, without
twistd's daemon machinery; the asyncio reactor is installed first, on uvloop
with C{--uvloop} (twistd has chosen its loop before it reads options).
"""

import sys

from funcnodes_tw import aio


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        # Before the options are parsed: parsing imports the twistd plugin's
        # module, which installs the reactor. Options checks the spelling.
        reactor = aio.install_reactor(uvloop="--uvloop" in argv)
    except aio.WrongReactor as exc:
        sys.stderr.write(f"funcnodes-tw: {exc}\n")
        return 1
    from twisted.application.service import IService
    from twisted.logger import Logger, globalLogBeginner
    from twisted.python import usage

    from funcnodes_tw.logs import LEVELS, file_observer, filtered
    from funcnodes_tw.tap import Options, makeService

    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError as exc:
        sys.stderr.write(f"Usage: funcnodes-tw {options}\nfuncnodes-tw: {exc}\n")
        return 2

    worker_settings = options.settings
    stdout = filtered(
        file_observer(sys.stdout, worker_settings.log_format), LEVELS[worker_settings.log_level]
    )
    globalLogBeginner.beginLoggingTo([stdout], redirectStandardIO=False)
    if aio.on_uvloop():
        Logger().info("Running on uvloop")
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
