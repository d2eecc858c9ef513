"""
Check a running worker from outside, as a user's browser would (tests/smoke.sh).

Needs nothing but the standard library, so it runs with any python3 against
a worker installed in a venv without our test extras. It waits for the
worker's log line "Open the UI: http://HOST:PORT/", then checks the files
in $FUNCNODES_CONFIG_DIR/workers/, the C{uuid} command over the WebSocket,
the redirect from C{/} to the UI and the UI's C{index.html}, and that a
funcnodes-basic add node computes. On success it writes "UUID PID" (the
worker's uuid and the pid its C{.p} file names) as its last line; any
failure exits with status 1 and a message saying what was wrong.

    python3 tests/smoke_check.py --log worker.log --config-dir DIR --launcher-pid PID
"""

import argparse
import base64
import hashlib
import http.client
import json
import os
import re
import socket
import struct
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlsplit

OPEN_UI = re.compile(r"Open the UI: http://([^/\s:]+|\[[^\]\s]+\]):(\d+)/")
#: Scripts and style sheets a page loads from its own server.
ASSET = re.compile(r'(?:src|href)="((?![a-z]+:|//)[^"]+\.(?:js|css))"')
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG, CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
TIMEOUT = 15.0


class SmokeFailure(Exception):
    pass


def say(text):
    sys.stderr.write(f"smoke_check: {text}\n")
    sys.stderr.flush()


def running(pid):
    """
    Whether C{pid} is running and not a zombie waiting for its parent.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for_address(log, launcher_pid, wait):
    """
    The worker's host and port, from its "Open the UI" log line.
    """
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            match = OPEN_UI.search(log.read_text(errors="replace"))
        except FileNotFoundError:
            match = None
        if match:
            return match.group(1).strip("[]"), int(match.group(2))
        if launcher_pid and not running(launcher_pid):
            raise SmokeFailure(f"the command exited before logging 'Open the UI' (see {log})")
        time.sleep(0.2)
    raise SmokeFailure(f"no 'Open the UI' line in {log} after {wait:.0f} s")


class WebSocket:
    """
    The least a client needs (RFC 6455): handshake, masked text frames out,
    whole text messages in; binary messages are read and skipped.
    """

    def __init__(self, host, port, origin):
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.buffer = b""
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
        )
        self.sock.sendall(request.encode("ascii"))
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status, *lines = head.split("\r\n")
        if " 101 " not in f"{status} ":
            raise SmokeFailure(f"WebSocket handshake refused: {status}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines)}
        expected = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise SmokeFailure("WebSocket handshake: wrong Sec-WebSocket-Accept")

    def _read_until(self, marker):
        while marker not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _read_exactly(self, n):
        while len(self.buffer) < n:
            self._fill()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise SmokeFailure("the worker closed the connection")
        self.buffer += data

    def send_frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + masked)

    def read_frame(self):
        first, second = self._read_exactly(2)
        if second & 0x80:
            raise SmokeFailure("the worker sent a masked frame")
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self._read_exactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read_exactly(8))
        return bool(first & 0x80), first & 0x0F, self._read_exactly(n)

    def read_message(self):
        """
        The next whole data message, as (opcode, payload); pings are answered.
        """
        opcode, parts = None, []
        while True:
            fin, op, payload = self.read_frame()
            if op == PING:
                self.send_frame(PONG, payload)
                continue
            if op == CLOSE:
                raise SmokeFailure(f"the worker closed the WebSocket: {payload[2:]!r}")
            if op != CONTINUATION:
                opcode = op
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)

    def close(self):
        try:
            self.send_frame(CLOSE, struct.pack("!H", 1000))
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                if self.read_frame()[1] == CLOSE:
                    break
        except (OSError, SmokeFailure):
            pass
        finally:
            self.sock.close()


class Client:
    """
    Commands over one WebSocket, in the shapes of PROTOCOL.md 2.1 and 2.2.
    """

    def __init__(self, host, port):
        self.ws = WebSocket(host, port, origin=f"http://{host}:{port}")
        self.next_id = 0

    def call(self, cmd, **kwargs):
        self.next_id += 1
        msgid = f"smoke-{self.next_id}"
        message = {"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": msgid}
        self.ws.send_frame(TEXT, json.dumps(message).encode())
        while True:
            opcode, payload = self.ws.read_message()
            if opcode != TEXT:
                continue  # io_value previews
            reply = json.loads(payload)
            if reply.get("id") != msgid:
                continue  # events, progress
            if reply.get("type") == "error":
                raise SmokeFailure(f"{cmd} failed: {reply.get('error')}")
            if reply.get("type") != "result":
                raise SmokeFailure(f"{cmd}: unexpected reply {reply!r}")
            return reply["result"]


def http_get(host, port, target):
    connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        connection.request("GET", target, headers={"Accept": "text/html"})
        response = connection.getresponse()
        return response.status, response.getheader("Location"), \
            response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


def check_registration(config_dir, host, port):
    """
    The one worker json in C{workers/}: its uuid, and the pid of its C{.p}.
    """
    registrations = list((config_dir / "workers").glob("worker_*.json"))
    if len(registrations) != 1:
        raise SmokeFailure(
            f"expected one worker json in {config_dir}/workers, found {registrations}"
        )
    registration = json.loads(registrations[0].read_text())
    uuid = registration.get("uuid")
    if registrations[0].name != f"worker_{uuid}.json":
        raise SmokeFailure(f"{registrations[0].name} holds uuid {uuid!r}")
    if (registration.get("host"), registration.get("port")) != (host, port):
        raise SmokeFailure(f"the worker json says {registration.get('host')}:"
                           f"{registration.get('port')}, the log {host}:{port}")
    process_file = config_dir / "workers" / f"worker_{uuid}.p"
    try:
        pid = int(process_file.read_text().strip())
    except (OSError, ValueError) as exc:
        raise SmokeFailure(f"no pid in {process_file}: {exc}") from None
    if not running(pid):
        raise SmokeFailure(f"{process_file} names pid {pid}, which is not running")
    return uuid, pid


def check_ui(host, port):
    """
    C{GET /} sends a browser to the UI, whose C{index.html} and the scripts
    and style sheets it loads are served; returns those.
    """
    status, location, _, _ = http_get(host, port, "/")
    if status not in (301, 302, 303, 307, 308) or not location:
        raise SmokeFailure(f"GET / answered {status} without a redirect")
    base = f"http://{host}:{port}/"
    target = urlsplit(urljoin(base, location))
    if target.netloc != f"{host}:{port}" or not target.path.endswith("/index.html"):
        raise SmokeFailure(f"GET / redirects to {location!r}, not to the UI's index.html")
    worker_url = parse_qs(target.query).get("worker_url", [None])[0]
    if worker_url is None or worker_url.rstrip("/") != f"ws://{host}:{port}":
        raise SmokeFailure(f"the UI is sent to worker_url={worker_url!r}")
    status, _, content_type, body = http_get(host, port, f"{target.path}?{target.query}")
    if status != 200 or not content_type.startswith("text/html"):
        raise SmokeFailure(f"{target.path} answered {status} {content_type!r}")
    if b"<html" not in body.lower():
        raise SmokeFailure(f"{target.path} is no HTML page ({len(body)} bytes)")
    assets = ASSET.findall(body.decode("utf-8", "replace"))
    if not assets:
        raise SmokeFailure(f"{target.path} loads no script or style sheet from the worker")
    for asset in assets:
        status, _, _, body = http_get(host, port, urljoin(target.path, asset))
        if status != 200 or not body:
            raise SmokeFailure(f"{asset}, which index.html loads, answered {status}")
    return assets


def check_add_node(worker, a, b):
    """
    funcnodes-basic's add node, added over the WebSocket, computes a + b.
    """
    node = worker.call("add_node", id="add_node")
    nid = node["id"]
    worker.call("set_io_value", nid=nid, ioid="a", value=a)
    worker.call("set_io_value", nid=nid, ioid="b", value=b)
    deadline = time.monotonic() + TIMEOUT
    result = None
    while time.monotonic() < deadline:
        result = worker.call("get_io_value", nid=nid, ioid="out")
        if isinstance(result, (int, float)) and abs(result - (a + b)) < 1e-9:
            return
        time.sleep(0.1)
    raise SmokeFailure(f"add_node: out is {result!r} after a={a}, b={b}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--log", type=Path, required=True, help="the worker's output")
    parser.add_argument("--config-dir", type=Path, required=True,
                        help="the worker's FUNCNODES_CONFIG_DIR")
    parser.add_argument("--launcher-pid", type=int, help="stop waiting once this pid is gone")
    parser.add_argument("--wait", type=float, default=600.0,
                        help="seconds to wait for the 'Open the UI' line")
    args = parser.parse_args(argv)
    try:
        host, port = wait_for_address(args.log, args.launcher_pid, args.wait)
        say(f"the worker listens on {host}:{port}")
        uuid, pid = check_registration(args.config_dir, host, port)
        worker = Client(host, port)
        try:
            answer = worker.call("uuid")
            if answer != uuid:
                raise SmokeFailure(f"uuid answered {answer!r}, the worker json says {uuid!r}")
            assets = check_ui(host, port)
            say(f"GET / redirects to the UI, whose index.html is served, and {', '.join(assets)}")
            a, b = 2 + pid % 97, 0.25 * (1 + time.time_ns() % 13)
            check_add_node(worker, a, b)
            say(f"add_node computes {a} + {b}")
        finally:
            worker.ws.close()
    except (SmokeFailure, OSError, ValueError, KeyError) as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}")
        return 1
    sys.stdout.write(f"{uuid} {pid}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
