"""
Files clients put into the worker's C{files/} folder.

Names come from clients, so every name is checked before a byte is written:
no C{..}, no absolute paths, no backslashes or NUL bytes, and no symlinks on
the way inside C{files/}. Uploads land atomically: each file is written to a
staging folder beside C{files/} and renamed into place only when the whole
request was good, so a rejected upload leaves nothing behind.
"""

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

CHUNK = 256 * 1024


class BadFilename(ValueError):
    pass


def relative_name(filename):
    """
    Check a client's file name and return it as a relative path below C{files/}.

    A leading C{/} is refused, not stripped: the reference silently turned
    C{/abs/x} into C{abs/x}.
    """
    if not isinstance(filename, str) or not filename:
        raise BadFilename("filename must be a non-empty string")
    if "\x00" in filename or "\\" in filename:
        raise BadFilename("filename must not contain NUL bytes or backslashes")
    path = PurePosixPath(filename)
    if path.is_absolute():
        raise BadFilename("filename must be a relative path")
    parts = [part for part in path.parts if part != "."]
    if not parts or ".." in parts:
        raise BadFilename("filename must be a relative subpath of the files folder")
    return PurePosixPath(*parts)


def check_no_links(root, relative):
    """
    Refuse a target whose existing folders (or itself) are symlinks under C{root}.
    """
    current = Path(root)
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise BadFilename(f"{relative} passes through a symbolic link")
        if not current.exists():
            return


class Staging:
    """
    A private folder next to C{files/} where one request's files are written.
    """

    def __init__(self, files_root):
        self.root = Path(files_root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=".upload-", dir=self.root.parent))
        self.entries = []  # (staged path, relative name)

    def open(self, name):
        relative = relative_name(name)
        check_no_links(self.root, relative)
        staged = self.folder / str(len(self.entries))
        self.entries.append((staged, relative))
        return open(staged, "wb")

    def commit(self):
        """
        Move every staged file into place; each replaces its target atomically.
        """
        for staged, relative in self.entries:
            check_no_links(self.root, relative)
            target = self.root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(staged, 0o600)
            os.replace(staged, target)
        self.discard()
        return [relative for _, relative in self.entries]

    def discard(self):
        shutil.rmtree(self.folder, ignore_errors=True)


class MultipartUpload:
    """
    A multipart body parsed chunk by chunk as it arrives, its C{file} parts
    written to a staging folder, so a large upload touches the disk once.

    After a part fails (a bad name, a malformed body) the rest of the body is
    ignored; L{commit} raises the error and L{discard}s. Both remove or move
    files, which takes long for big ones: call them in a thread.
    """

    def __init__(self, content_type, files_root):
        from funcnodes_tw import formdata

        self.parser = formdata.StreamingFormDataParser(headers={"Content-Type": content_type})
        self.staging = Staging(files_root)
        self.target = formdata.FileTarget(self.staging)
        self.parser.register("file", self.target)
        self.error = None

    def feed(self, chunk):
        if self.error is not None:
            return
        try:
            self.parser.data_received(chunk)
        except Exception as error:
            self.error = error

    def commit(self):
        """
        Move the staged files into place; the relative paths, in order.
        """
        try:
            if self.error is not None:
                raise self.error
            self.target.on_finish()
            return self.staging.commit()
        except BaseException:
            self.discard()
            raise

    def discard(self):
        self.target.on_finish()
        self.staging.discard()


def store_multipart(content, content_type, files_root):
    """
    Parse a multipart body from file object C{content} into C{files_root}.

    For a body that was stored whole (a Site that did not stream it); runs in
    a thread. Returns the relative paths written, in order.
    """
    upload = MultipartUpload(content_type, files_root)
    for chunk in iter(lambda: content.read(CHUNK), b""):
        upload.feed(chunk)
        if upload.error is not None:
            break
    return upload.commit()


def store_bytes(data, filename, files_root):
    """
    The WebSocket C{upload} command's path: same checks, same atomic write.
    """
    staging = Staging(files_root)
    try:
        with staging.open(filename) as f:
            f.write(data)
        return staging.commit()[0]
    except BaseException:
        staging.discard()
        raise


def common_path(paths):
    """
    What C{POST /upload/} reports: the one path, or the longest shared prefix.
    """
    if len(paths) == 1:
        return paths[0].as_posix()
    common = []
    for parts in zip(*(p.parts for p in paths)):
        if any(part != parts[0] for part in parts):
            break
        common.append(parts[0])
    return PurePosixPath(*common).as_posix() if common else "."
