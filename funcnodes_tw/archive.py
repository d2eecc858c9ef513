"""
The exported worker: a zip with C{config}, C{state} and C{files/...}.

The format is the reference's (PROTOCOL.md 12.3), so exports move between
funcnodes_tw and the reference worker in both directions. Unpacking checks
every member name like an upload: a zip cannot write outside C{files/}.
"""

import io
import json
import zipfile

from funcnodes_tw import uploads, wire


def pack(config, state, files_root=None):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config", json.dumps(config, indent=2))
        archive.writestr("state", json.dumps(json.loads(wire.dumps(state)), indent=2))
        if files_root is not None and files_root.is_dir():
            for path in sorted(files_root.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    archive.write(path, f"files/{path.relative_to(files_root).as_posix()}")
    return buffer.getvalue()


def as_object(value, what):
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


def unpack(data, files_root):
    """
    Check and read an export; its files land in C{files_root}, all or none.

    @return: (config, state)
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ValueError("data is not a zip file") from None
    with archive:
        names = archive.namelist()
        for required in ("config", "state"):
            if required not in names:
                raise ValueError(f"the export has no '{required}' entry")
        config = as_object(archive.read("config"), "config")
        state = as_object(archive.read("state"), "state")
        staging = uploads.Staging(files_root)
        try:
            for info in archive.infolist():
                if info.filename.startswith("files/") and not info.is_dir():
                    with staging.open(info.filename[len("files/"):]) as out, archive.open(info) as src:
                        while chunk := src.read(uploads.CHUNK):
                            out.write(chunk)
            staging.commit()
        except BaseException:
            staging.discard()
            raise
    return config, state
