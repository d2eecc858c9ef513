"""
Where the worker's log goes: a rotating C{worker.log} in its data folder,
beside whatever the runner (twistd, the launcher, journald) does with it;
as readable text, or as one JSON object a line for Loki, ELK or journald.
"""

import sys

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

ROTATE_LENGTH = 100_000
ROTATED_FILES = 5

LEVELS = {name: LogLevel.levelWithName(name) for name in ("debug", "info", "warn", "error")}


def filtered(observer, level):
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])


def file_observer(file, log_format="text"):
    """
    Text lines, or (C{json}) Twisted's own JSON form of each event, one a
    line: newline-delimited, as log shippers read it, not RFC 7464's
    record separators.
    """
    if log_format == "json":
        return jsonFileLogObserver(file, recordSeparator="")
    return textFileLogObserver(file)


def json_stdout():
    """
    JSON on standard output for C{twistd --logger=funcnodes_tw.logs.json_stdout}:
    twistd makes its own log observer, after the service is made.
    """
    return file_observer(sys.stdout, "json")


class WorkerLog:
    """
    C{worker.log} (100 KB x 5) in C{folder}, while started.
    """

    def __init__(self, folder, level=LogLevel.info, log_format="text"):
        self.folder = folder
        self.level = level
        self.log_format = log_format
        self._file = None
        self._observer = None

    def start(self):
        self._file = LogFile("worker.log", str(self.folder), ROTATE_LENGTH, maxRotatedFiles=ROTATED_FILES)
        self._observer = filtered(file_observer(self._file, self.log_format), self.level)
        globalLogPublisher.addObserver(self._observer)

    def stop(self):
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._file.close()
            self._observer = self._file = None
