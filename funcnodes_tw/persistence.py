"""
Files on disk: where they live and how they are written.

The layout is the reference worker's (PROTOCOL.md section 9) so that the
FuncNodes manager and CLI find us. Every write is atomic: a temporary file in
the same directory, fsync, then rename, keeping the previous version beside it.
"""

import json
import os
import tempfile
from pathlib import Path

import funcnodes_core as fn
from twisted.logger import Logger

from funcnodes_tw import wire

_log = Logger()

STATE_FILE = "nodespace.json"


def config_dir():
    """
    C{$FUNCNODES_CONFIG_DIR}, else C{~/.funcnodes}, as funcnodes-core reads it.
    """
    return Path(fn.config.get_config_dir())


def workers_dir():
    return config_dir() / "workers"


class WorkerFiles:
    """
    The paths that belong to one worker.
    """

    def __init__(self, uuid, data_path=None, root=None):
        root = Path(root) if root is not None else workers_dir()
        self.uuid = uuid
        self.workers = root
        self.default_data = root / f"worker_{uuid}"
        self.data = Path(data_path or self.default_data).absolute()
        self.config = root / f"worker_{uuid}.json"
        self.process = root / f"worker_{uuid}.p"
        self.runstate = root / f"worker_{uuid}.runstate"
        self.state = self.data / STATE_FILE
        self.files = self.data / "files"
        self.local_scripts = self.data / "local_scripts"

    def create(self):
        for folder in (self.workers, self.data, self.files, self.local_scripts):
            folder.mkdir(parents=True, exist_ok=True)


def write_atomic(path, data, keep_previous=True):
    """
    Replace C{path} with C{data} (bytes) so that a crash leaves old or new.

    With C{keep_previous} the replaced file stays as C{<name>.bu}, so even a
    file that was damaged by hand has a predecessor to recover from.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        if keep_previous and path.exists():
            _keep_backup(path)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _keep_backup(path):
    """
    Make C{<name>.bu} the current C{path} without ever taking C{path} away.

    A hard link, not a rename: renaming C{path} to the backup first left a
    moment without C{path}, and a kill -9 in it made the next start find no
    state and begin with an empty graph. Now a crash at any point leaves
    C{path} whole (at worst without a backup).
    """
    backup = path.with_name(path.name + ".bu")
    remove(backup)
    try:
        os.link(path, backup)
    except OSError:  # a file system without hard links
        write_atomic(backup, path.read_bytes(), keep_previous=False)


def remove_stale_temporaries(path):
    """
    Delete C{path}'s temporary files left by a writer that was killed.
    """
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        remove(stale)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj, keep_previous=True):
    write_atomic(path, wire.dumps(obj), keep_previous=keep_previous)


def write_config(path, obj):
    """
    The registration file, indented like the reference writes it.
    """
    write_atomic(path, json.dumps(obj, indent=2).encode("utf-8"), keep_previous=False)


class StateFileError(Exception):
    """
    The saved state exists but cannot be used; it was moved aside.
    """


def read_json(path):
    """
    Load a JSON file, or return None if it does not exist.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    return json.loads(raw)


def load_state(path):
    """
    Read a saved WorkerState, or None when there is none.

    A file that is not a JSON object is renamed to C{<name>.corrupt-<n>} and
    L{StateFileError} is raised: never silently start empty over a user's graph.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        state = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFileError(f"{path} is not valid JSON ({exc}); moved to {_move_aside(path)}")
    if not isinstance(state, dict) or not all(
        isinstance(state.get(key) or {}, dict) for key in ("backend", "meta", "view")
    ):
        raise StateFileError(f"{path} is not a FuncNodes worker state; moved to {_move_aside(path)}")
    return state


def _move_aside(path):
    n = 0
    while True:
        target = path.with_name(f"{path.name}.corrupt-{n}")
        if not target.exists():
            os.replace(path, target)
            return target
        n += 1


def write_text(path, text):
    write_atomic(path, text.encode("utf-8"), keep_previous=False)


def remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
