"""
Commands about the worker's files.
"""

import base64
import binascii

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from funcnodes_tw import archive, uploads
from funcnodes_tw.commands import command, library

_log = Logger()


@command
def upload(worker, data, filename):
    """
    Store base64 C{data} as C{files/<filename>}, with the checks and the
    atomic replace of C{POST /upload/}; returns C{filename} as given.
    """
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise ValueError("data must be base64") from None
    elif not isinstance(data, bytes):
        raise ValueError("data must be a base64 string")
    uploads.relative_name(filename)
    d = deferToThread(uploads.store_bytes, data, filename, worker.files.files)
    return d.addCallback(lambda _: filename)


#: Keys of the registration file that describe this machine, not the graph.
LOCAL_KEYS = ("pid", "python_path", "env_path", "data_path", "uuid", "host", "port", "ssl")


def exportable_config(worker):
    config = worker.worker_json()
    for key in LOCAL_KEYS:
        config.pop(key, None)
    return config


@command
def export_worker(worker, with_files=True):
    """
    The worker as a zip (C{config}, C{state}, C{files/...}), as the reference
    packs it; saved first, zipped in a thread.
    """
    state = worker.save_state()
    exported = worker.save_state(export=True)
    config = exportable_config(worker)
    d = worker.save(state)
    d.addCallback(
        lambda _: deferToThread(
            archive.pack, config, exported, worker.files.files if with_files else None
        )
    )
    return d


@command(saves=True)
def update_from_export(worker, data):
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except binascii.Error:
            raise ValueError("data must be a base64 zip") from None
    d = deferToThread(archive.unpack, data, worker.files.files)
    d.addCallback(lambda contents: update(worker, contents[0], contents[1]))
    return d


@command(saves=True)
def update(worker, config, state):
    """
    Apply an exported config (its package dependencies, installed with pip
    when missing) and state. A package that cannot be added is reported
    (progress and log) and the state is loaded anyway, as the reference does.
    """
    config, state = archive.as_object(config, "config"), archive.as_object(state, "state")
    return defer.Deferred.fromCoroutine(_update(worker, config, state))


async def _update(worker, config, state):
    for name, dep in (config.get("package_dependencies") or {}).items():
        try:
            await library.add_dependency(worker, name, (dep or {}).get("version"), sync=False)
        except Exception as exc:
            _log.error("Package {name} could not be added: {exc}", name=name, exc=exc)
    worker.load(library.keep_io_ids(state))
    worker.worker_event("fullsync")
