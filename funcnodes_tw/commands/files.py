"""
Commands about the worker's files.
"""

import base64
import binascii

from twisted.internet.threads import deferToThread

from funcnodes_tw import uploads
from funcnodes_tw.commands import command


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
