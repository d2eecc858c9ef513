"""Helpers for driving the funcnodes-react-flow web UI against a worker subprocess.

Kept free of pytest so the pieces can be reused from scripts while debugging the UI.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import logging
import re
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0):
    """Poll until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"worker exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def stop_process(proc: subprocess.Popen, grace: float = 5.0):
    """terminate(), then kill() if the process is still alive after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def _dependents(names: set[str], site: Path) -> set[str]:
    """``names`` and every distribution in ``site`` that requires one of them (not as an
    extra), by their canonical names."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found = {canonicalize_name(n) for n in names}
    while True:
        more = set()
        for dist in importlib.metadata.distributions(path=[str(site)]):
            name = canonicalize_name(dist.metadata["Name"])
            for text in dist.requires or []:
                req = Requirement(text)
                if canonicalize_name(req.name) in found and not (
                    req.marker and "extra" in str(req.marker)
                ):
                    more.add(name)
        if more <= found:
            return found
        found |= more


def venv_without(folder: Path, *names: str) -> Path:
    """A venv that has this one's packages except ``names`` (and what requires them).

    Every entry of this site-packages is linked into the new one, so ``.pth`` files (the
    editable install) work and pip sees the packages as its own; the left-out ones are
    simply absent. Returns a pip constraints file pinning every linked distribution to its
    version: with it, a pip run in the new venv installs only what is missing and never
    replaces (deletes through a link) a file of this venv.
    """
    import importlib.metadata

    from packaging.utils import canonicalize_name

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    source = Path(sysconfig.get_paths()["purelib"])
    site = folder / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    left_out = _dependents(set(names), source)
    hidden, pins = set(), []
    for dist in importlib.metadata.distributions(path=[str(source)]):
        name = canonicalize_name(dist.metadata["Name"])
        if name in left_out:
            # RECORD names the package's folders and its .dist-info; ".." are scripts.
            hidden.update(f.parts[0] for f in dist.files or () if f.parts[0] != "..")
        elif '"editable": true' not in (dist.read_text("direct_url.json") or ""):
            pins.append(f"{name}=={dist.version}")
    for entry in source.iterdir():
        if entry.name not in hidden and entry.name != "__pycache__":
            (site / entry.name).symlink_to(entry)
    constraints = folder / "constraints.txt"
    constraints.write_text("\n".join(sorted(pins)) + "\n")
    return constraints


def run_in_thread(fn, *args, timeout: float | None = None, **kwargs):
    """Run fn in a fresh thread and return its result (re-raising its exception).

    Playwright's sync API and asyncio.run() both refuse to start when the calling thread
    already has an asyncio loop, which is the case under pytest-twisted's asyncio reactor.
    """
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: B036 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name=getattr(fn, "__name__", "worker"))
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"{fn!r} still running after {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def ws_command(port: int, cmd: str, timeout: float = 120.0, **kwargs):
    """Send one command to a worker over WebSocket and return its `result`.

    Uses aiohttp's client (a dependency of the reference worker) on a private loop.
    """
    import aiohttp

    async def run():
        msg_id = f"setup-{cmd}"
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"ws://127.0.0.1:{port}", max_msg_size=0) as ws:
                await ws.send_json({"type": "cmd", "cmd": cmd, "kwargs": kwargs, "id": msg_id})
                async with asyncio.timeout(timeout):
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        data = json.loads(msg.data)
                        if data.get("id") != msg_id:
                            continue
                        if data.get("type") == "error":
                            raise RuntimeError(f"{cmd} failed: {data.get('error')}")
                        if data.get("type") == "result":
                            return data.get("result")
        raise RuntimeError(f"connection closed before the result of {cmd}")

    return run_in_thread(asyncio.run, run())


# --------------------------------------------------------------------------- static UI


def ui_static_dir() -> Path:
    import funcnodes_react_flow

    return Path(funcnodes_react_flow.__file__).parent / "static"


class StaticUIServer:
    """Serve the UI bundle under /static/ (index.html loads /static/... by absolute path)."""

    def __init__(self, static_dir: Path | None = None):
        static_dir = Path(static_dir or ui_static_dir())

        class Handler(http.server.SimpleHTTPRequestHandler):
            def translate_path(self, path):
                path = path.split("?", 1)[0].split("#", 1)[0]
                if not path.startswith("/static/"):
                    return str(static_dir / "__not_served__")
                return super().translate_path(path[len("/static"):])

            def log_message(self, format, *args):
                log.debug("ui http: " + format, *args)

        self._httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(static_dir))
        )
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, worker_port: int) -> str:
        return (
            f"http://127.0.0.1:{self.port}/static/index.html"
            f"?worker_url=ws://127.0.0.1:{worker_port}"
        )

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


# --------------------------------------------------------------------------- UI driver


def _exact(text: str) -> re.Pattern:
    return re.compile(f"^{re.escape(text)}$")


class FuncNodesUI:
    """Page-object for the funcnodes-react-flow UI (selectors checked against 2.4.0).

    Nodes are react-flow nodes (`.react-flow__node[data-id=<node uuid>]`) titled by
    `.nodeheader_title_text`; each IO row is `.nodeinput`/`.nodeoutput` with an `.ioname`,
    a number `<input>` (committed on blur) or an `.iovaluefield` preview, and react-flow
    handles carrying `data-handleid=<io id>` (inputs have a left `target` and a right
    `source` handle, outputs a right `source` handle).
    """

    def __init__(self, page):
        self.page = page
        self.flow = page.locator(".react-flow")
        self.nodes = page.locator(".react-flow__node")
        self.edges = page.locator(".react-flow__edge")

    # library -------------------------------------------------------------
    def open_library(self):
        self.page.get_by_role("button", name="Expand right").click()

    def close_library(self):
        self.page.get_by_role("button", name="Collapse right").click()

    def shelf(self, name: str):
        return self.page.locator(".shelftitle_text", has_text=_exact(name))

    def add_node(self, node_id: str, label: str):
        """Filter the library by node_id and double-click the entry (one click does nothing)."""
        self.page.get_by_placeholder("Filter").fill(node_id)
        self.page.locator(".libnodeentry", has_text=_exact(label)).dblclick()
        return self.node(label)

    def place_node(self, node_id: str, label: str, fx: float = 0.4, fy: float = 0.3):
        """Add a node from the open library, close the library and bring the node into view."""
        node = self.add_node(node_id, label)
        node.wait_for(state="visible")
        self.close_library()
        self.zoom_out(1.0)
        self.move_node(node, fx, fy)
        return node

    # nodes ----------------------------------------------------------------
    def node(self, title: str):
        return self.nodes.filter(
            has=self.page.locator(".nodeheader_title_text", has_text=_exact(title))
        )

    def _io_row(self, node, kind: str, io: str):
        return node.locator(f".node{kind}").filter(
            has=self.page.locator(".ioname", has_text=_exact(io))
        )

    def input_field(self, node, io: str):
        return self._io_row(node, "input", io).locator("input")

    def output_value(self, node, io: str):
        return self._io_row(node, "output", io).locator(".iovaluefield")

    def text_field(self, node, io: str):
        """The editable field of an input: an ``<input>``, or a ``<textarea>`` for strings."""
        return self._io_row(node, "input", io).locator("input, textarea")

    def checkbox(self, node, io: str):
        return self._io_row(node, "input", io).locator('input[type="checkbox"]')

    def file_input(self, node, io: str):
        """The (hidden) ``<input type=file>`` behind an upload button of a plugin renderer."""
        return self._io_row(node, "input", io).locator('input[type="file"]')

    def paste_input(self, node, io: str, text: str):
        """Put text into a field at once, like a paste (typing megabytes is impractical)."""
        field = self.text_field(node, io)
        field.fill(text)
        field.press("Tab")

    def set_input(self, node, io: str, text: str):
        """Type like a user; the UI sends set_io_value when the field loses focus."""
        field = self.input_field(node, io)
        field.click()
        field.press("Control+a")
        field.press_sequentially(text)
        field.press("Tab")

    def handle(self, node, io: str, kind: str):
        return node.locator(f'.react-flow__handle.{kind}[data-handleid="{io}"]')

    # mouse ----------------------------------------------------------------
    @staticmethod
    def _center(locator):
        box = locator.bounding_box()
        assert box is not None, f"{locator} is not visible"
        return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    def _drag(self, start, end):
        mouse = self.page.mouse
        mouse.move(*start)
        mouse.down()
        mouse.move(*end, steps=12)
        mouse.up()

    def zoom(self) -> float:
        style = self.page.locator(".react-flow__viewport").get_attribute("style") or ""
        match = re.search(r"scale\(([\d.]+)\)", style)
        return float(match.group(1)) if match else 1.0

    def zoom_out(self, target: float = 1.0):
        """Wheel over an empty corner of the pane; the UI zooms to ~3.7x on the first node."""
        box = self.flow.bounding_box()
        self.page.mouse.move(box["x"] + box["width"] - 20, box["y"] + 20)
        for _ in range(40):
            if self.zoom() <= target:
                return
            self.page.mouse.wheel(0, 100)
            self.page.wait_for_timeout(50)
        raise AssertionError(f"could not zoom out to {target} (zoom {self.zoom()})")

    def move_node(self, node, fx: float, fy: float):
        """Drag a node by its title to a point given as fractions of the canvas size."""
        box = self.flow.bounding_box()
        target = (box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
        self._drag(self._center(node.locator(".nodeheader_title_text")), target)

    def connect(self, src_node, src_io: str, dst_node, dst_io: str):
        """Drag from an output's source handle onto an input's target handle."""
        self._drag(
            self._center(self.handle(src_node, src_io, "source")),
            self._center(self.handle(dst_node, dst_io, "target")),
        )
