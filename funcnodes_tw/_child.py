"""
The child's side of L{funcnodes_tw.isolation} and L{funcnodes_tw.processes}.

    python -m funcnodes_tw._child pool PPID
        Run calls for the worker's process pool, one at a time: frames of
        C{dill.dumps((function, args, kwargs))} arrive on fd 0, replies of
        C{dill.dumps((ok, value))} leave on fd 3; each frame is an 8-byte
        big-endian length and the payload. Standard output and error stay the
        worker's. The first frame sets C{sys.path} to the worker's.
    python -m funcnodes_tw._child exec PPID ARGV...
        Become the leader of a new process group, then exec ARGV: the worker
        kills the whole group, so a command's own children go with it.

Both die with the worker (Linux: C{PR_SET_PDEATHSIG}), also when it is
killed with SIGKILL and cannot clean up. Only the standard library is
imported before the first call, so a child starts in a few milliseconds.
"""

import os
import signal
import struct
import sys

HEADER = struct.Struct("!Q")
PR_SET_PDEATHSIG = 1
REPLIES_FD = 3


def die_with_parent(ppid):
    """
    Ask the kernel for SIGKILL when the worker dies; leave if it already did.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != ppid:
        os._exit(1)


def read_frame(stream):
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return payload


def run_call(frame):
    import dill

    try:
        function, args, kwargs = dill.loads(frame)
        result = function(*args, **kwargs)
        if hasattr(result, "__await__"):
            import asyncio

            async def wait():
                return await result

            result = asyncio.run(wait())
        return dill.dumps((True, result))
    except BaseException as exc:  # the worker gets every failure, even SystemExit
        import traceback

        text = traceback.format_exc()
        try:
            return dill.dumps((False, (exc, text)))
        except Exception:
            return dill.dumps((False, (RuntimeError(f"{type(exc).__name__}: {exc}"), text)))


def pool():
    # Ctrl-C in a terminal reaches the whole process group: the worker
    # decides when its pool stops, not the keyboard.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep our pipes from the processes a node may start, and give node
    # code a harmless standard input.
    jobs = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(REPLIES_FD), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.close(REPLIES_FD)
    setup = read_frame(jobs)
    if setup is None:
        return
    for path in setup.decode("utf-8").split("\0"):
        if path not in sys.path:
            sys.path.append(path)
    while True:
        frame = read_frame(jobs)
        if frame is None:
            return
        reply = run_call(frame)
        replies.write(HEADER.pack(len(reply)) + reply)
        replies.flush()


def execute(argv):
    os.setpgid(0, 0)
    # Python ignores these; the command should not inherit that.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"{argv[0]}: {exc.strerror}\n")
        os._exit(127)


def main(argv):
    mode, ppid, rest = argv[0], int(argv[1]), argv[2:]
    die_with_parent(ppid)
    if mode == "pool":
        pool()
    elif mode == "exec":
        execute(rest)
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
