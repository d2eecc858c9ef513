"""
pip's output as a few steps a person can follow.

pip prints a line for every index it looks in, every requirement it finds
satisfied (with the path of the environment) and every warning: dozens of
lines nobody can read in a status bar, showing the server's paths and
package sources to every client. L{PipSteps} keeps what a person wants to
know (resolving, downloading NAME (size) with a percentage, installing) and
moves a progress value across them; L{failure} turns a failed run into one
short sentence. pip's own output goes to the log untouched
(L{funcnodes_tw.packages.PipProtocol}).

Byte progress comes from C{--progress-bar raw} (pip >= 24.1), which prints
C{Progress CURRENT of TOTAL} lines; older pips print none, and a download is
then one message without a percentage.
"""

import re

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidSdistFilename, InvalidWheelFilename
from packaging.utils import parse_sdist_filename, parse_wheel_filename
from packaging.version import InvalidVersion, Version

#: Where the steps of one pip run lie on the 0..1 progress scale; the
#: command's own steps (starting, adding the shelf, done) take the rest.
RESOLVING = 0.1
DOWNLOADED = 0.7
INSTALLING = 0.75

_DOWNLOADING = re.compile(r"\s*Downloading (\S+)(?: \(([^)]*)\))?\s*$")
_PROGRESS = re.compile(r"Progress (\d+) of (\d+)\s*$")
_INSTALLING = re.compile(r"Installing collected packages: (.+)$")
_NO_VERSION = re.compile(
    r"Could not find a version that satisfies the requirement (\S+) \(from versions: (.*)\)"
)
_UNREACHABLE = re.compile(
    r"NameResolutionError|Failed to establish a new connection|ConnectTimeout|"
    r"Network is unreachable|Temporary failure in name resolution|Connection refused"
)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
_PATH = re.compile(r"""(?<![\w.])(?:/|[A-Za-z]:\\)[^\s'"()]*""")
LONGEST = 200


def distribution(filename):
    """
    C{"funcnodes-numpy 0.2.12"} for a wheel or sdist file name or URL.
    """
    base = filename.rstrip("/").rsplit("/", 1)[-1]
    try:
        name, version, *_ = parse_wheel_filename(base)
    except InvalidWheelFilename:
        try:
            name, version = parse_sdist_filename(base)
        except InvalidSdistFilename:
            return hide_paths(base)
    return f"{name} {version}"


def hide_paths(text):
    """
    C{text} without addresses (an index, a proxy) and with file system
    paths cut to their last part.
    """
    text = _URL.sub("…", text)
    return _PATH.sub(lambda m: m.group(0).rstrip("/\\").rsplit("/", 1)[-1] or "…", text)


def _short(text):
    return text if len(text) <= LONGEST else text[: LONGEST - 1] + "…"


def _names(packages):
    names = [p.strip() for p in packages.split(",") if p.strip()]
    if len(names) <= 3:
        return ", ".join(names)
    return f"{', '.join(names[:2])} and {len(names) - 2} more"


class PipSteps:
    """
    Reads one pip run's output lines and says C{report(text, progress)}
    for each step; C{progress} only rises, from L{RESOLVING} to
    L{INSTALLING}.
    """

    def __init__(self, report):
        self.report = report
        self.floor = RESOLVING
        self.download = None
        self.said = None
        self.value = 0.0

    def _say(self, text, value):
        value = max(self.value, round(value, 3))
        if (text, value) == self.said:
            return
        self.said, self.value = (text, value), value
        self.report(text, value)

    def resolving(self):
        self._say("resolving", RESOLVING)

    def line(self, text):
        downloading = _DOWNLOADING.match(text)
        if downloading:
            self._downloading(*downloading.groups())
            return
        progress = _PROGRESS.match(text)
        if progress and self.download is not None:
            self._progress(int(progress.group(1)), int(progress.group(2)))
            return
        installing = _INSTALLING.match(text)
        if installing:
            self._finish_download()
            self._say(f"installing {_names(installing.group(1))}", INSTALLING)

    def _downloading(self, target, size):
        self._finish_download()
        label = distribution(target) + (f" ({size})" if size else "")
        # Each download takes half of what is left before DOWNLOADED: the
        # value rises without knowing how many downloads will come.
        self.download = (label, self.floor, (self.floor + DOWNLOADED) / 2)
        self._say(f"downloading {label}", self.floor)

    def _progress(self, current, total):
        label, low, high = self.download
        if total <= 0:
            return
        fraction = min(max(current / total, 0.0), 1.0)
        if fraction == 0:
            return  # "downloading NAME" said so already
        self._say(f"downloading {label} {int(fraction * 100)}%", low + (high - low) * fraction)

    def _finish_download(self):
        if self.download is not None:
            self.floor = self.download[2]
            self.download = None


def refuses_raw(lines):
    """
    Whether pip refused C{--progress-bar raw} (pip < 24.1).
    """
    return any("invalid choice: 'raw'" in line for line in lines)


def failure(lines):
    """
    One short sentence for a failed pip run, from its output lines; None
    when they hold no error.
    """
    lines = list(lines)
    errors = [line[len("ERROR:"):].strip() for line in lines if line.startswith("ERROR:")]
    usage = [line for line in lines if "invalid choice" in line or line.startswith("pip: error")]
    if not errors and usage:
        errors = usage
    if not errors:
        return None
    for error in errors:
        missing = _NO_VERSION.search(error)
        if missing:
            return _not_found(*missing.groups(), lines)
    return _short(hide_paths(errors[0]))


def _not_found(requirement, versions, lines):
    try:
        parsed = Requirement(requirement)
        name, spec = parsed.name, str(parsed.specifier)
    except InvalidRequirement:
        name, spec = requirement, ""
    versions = [v.strip() for v in versions.split(",") if v.strip() and v.strip() != "none"]
    if not versions:
        if any(_UNREACHABLE.search(line) for line in lines):
            return "the package index cannot be reached (no network?)"
        return f"no package {name} found in the package index"
    newest = max(versions, key=_version_key)
    if spec:
        return f"no version of {name} matches {spec} (newest: {newest})"
    return f"no version of {name} can be installed here (newest: {newest})"


def _version_key(text):
    try:
        return (1, Version(text))
    except InvalidVersion:
        return (0, Version("0"))
