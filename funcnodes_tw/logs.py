"""
Where the worker's log goes: a rotating C{worker.log} in its data folder,
beside whatever the runner (twistd, the launcher, journald) does with it.
"""

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

ROTATE_LENGTH = 100_000
ROTATED_FILES = 5

LEVELS = {name: LogLevel.levelWithName(name) for name in ("debug", "info", "warn", "error")}


def filtered(observer, level):
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])


class WorkerLog:
    """
    C{worker.log} (100 KB x 5) in C{folder}, while started.
    """

    def __init__(self, folder, level=LogLevel.info):
        self.folder = folder
        self.level = level
        self._file = None
        self._observer = None

    def start(self):
        self._file = LogFile("worker.log", str(self.folder), ROTATE_LENGTH, maxRotatedFiles=ROTATED_FILES)
        self._observer = filtered(textFileLogObserver(self._file), self.level)
        globalLogPublisher.addObserver(self._observer)

    def stop(self):
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._file.close()
            self._observer = self._file = None
