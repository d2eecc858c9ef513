"""Drive the real funcnodes-react-flow UI in headless Chromium against a worker subprocess.

The worker under test is ours (``python -m funcnodes_tw``) unless
``FUNCNODES_TW_BROWSER_TARGET=reference``, which runs the aiohttp reference worker through
``tests/refworker.py`` so the test itself can be validated against known-good behaviour.
Screenshots of every step land in the test's ``tmp_path`` next to ``worker.log``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from uidriver import (
    CHROMIUM,
    CHROMIUM_ARGS,
    FuncNodesUI,
    StaticUIServer,
    free_port,
    run_in_thread,
    stop_process,
    wait_for_port,
    ws_command,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

log = logging.getLogger(__name__)

TARGET = os.environ.get("FUNCNODES_TW_BROWSER_TARGET", "ours")
REFWORKER = Path(__file__).with_name("refworker.py")


def worker_command(port: int, datadir: Path, worker_uuid: str, target: str = TARGET) -> list[str]:
    """Command line of the worker under test; both variants take the same options."""
    if target == "reference":
        entry = [str(REFWORKER)]
    elif target == "ours":
        entry = ["-m", "funcnodes_tw"]
    else:
        raise ValueError(f"FUNCNODES_TW_BROWSER_TARGET: expected ours|reference, got {target!r}")
    return [
        sys.executable, *entry,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--data-path", str(datadir),
        "--uuid", worker_uuid,
    ]


@pytest.fixture
def chromium():
    """Skip (only) when the Debian chromium binary is absent; Playwright cannot download one."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed")
    return CHROMIUM


@pytest.fixture
def worker(tmp_path):
    """Start the worker with a private config dir and yield its port; stop it afterwards."""
    port = free_port()
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(tmp_path / "config"))
    logfile = tmp_path / "worker.log"
    cmd = worker_command(port, tmp_path / "data", uuid.uuid4().hex)
    log.info("starting worker: %s (log: %s)", cmd, logfile)
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, proc, timeout=30)
        except (RuntimeError, TimeoutError) as exc:
            tail = logfile.read_text(errors="replace")[-3000:]
            pytest.fail(f"worker did not come up: {exc}\n--- worker.log ---\n{tail}")
        if TARGET == "reference":
            # The reference starts with an empty library; ours ships funcnodes-basic.
            ws_command(port, "add_package_dependency", name="funcnodes-basic")
        yield port
    finally:
        stop_process(proc)


@pytest.fixture
def ui_server():
    with StaticUIServer() as server:
        yield server


def test_build_and_wire_graph_in_ui(chromium, worker, ui_server, tmp_path):
    """Add, edit and wire nodes purely through the UI and read results back from the page."""
    run_in_thread(_drive_ui, chromium, ui_server.url(worker), tmp_path, timeout=120)


def _drive_ui(chromium: str, url: str, shots: Path):
    # Playwright's sync API refuses to run in a thread that owns an asyncio loop (the
    # pytest-twisted asyncio reactor), hence this runs via run_in_thread.
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=10_000)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(10_000)
            steps = ["start"]
            problems: list[str] = []

            def on_page_error(exc):
                problems.append(f"after {steps[-1]}: uncaught {exc.stack or exc}")

            def on_console(msg):
                if msg.type == "error":
                    problems.append(f"after {steps[-1]}: console error {msg.text}")

            def shot(name: str):
                steps.append(name)
                page.screenshot(path=str(shots / f"{name}.png"))

            page.on("pageerror", on_page_error)
            page.on("console", on_console)
            try:
                _scenario(FuncNodesUI(page), expect, url, shot)
            except Exception:
                shot("99-failure")
                raise
            # The reference worker produces none of these; they point at protocol mismatches.
            assert not problems, "browser reported errors:\n" + "\n".join(problems)
        finally:
            browser.close()


def _scenario(ui: FuncNodesUI, expect, url: str, shot):
    """Add -> Mul graph: (2 + 3.5) * 4, then change an upstream input and watch it propagate.

    Output previews are rendered by the UI as JSON strings of the decoded binary io_value
    frame, hence the quotes in the expected texts (e.g. ``"5.5"``).
    """
    page = ui.page
    page.goto(url)
    ui.open_library()
    # The shelf only appears once the UI got a full library from the worker.
    expect(ui.shelf("basics")).to_be_visible()
    shot("01-connected")

    add = ui.add_node("add_node", "Add")
    expect(ui.nodes).to_have_count(1)
    expect(add).to_be_visible()
    ui.zoom_out(1.0)
    ui.move_node(add, 0.3, 0.3)
    shot("02-add-node")

    mul = ui.add_node("mul_node", "mul_node")
    expect(ui.nodes).to_have_count(2)
    ui.close_library()
    ui.zoom_out(1.0)
    ui.move_node(mul, 0.6, 0.55)
    shot("03-mul-node")

    ui.set_input(add, "a", "2")
    # b is still unset, so the node must not have produced an output yet.
    expect(ui.input_field(add, "a")).to_have_value("2")
    expect(ui.output_value(add, "out")).to_have_text("")
    ui.set_input(add, "b", "3.5")
    expect(ui.output_value(add, "out")).to_have_text('"5.5"')
    shot("04-add-computed")

    ui.connect(add, "out", mul, "a")
    expect(ui.edges).to_have_count(1)
    # A connected input is disabled and shows the value that arrived over the edge.
    expect(ui.input_field(mul, "a")).to_be_disabled()
    expect(ui.input_field(mul, "a")).to_have_value("5.5")
    shot("05-wired")

    ui.set_input(mul, "b", "4")
    expect(ui.output_value(mul, "out")).to_have_text('"22"')
    shot("06-mul-computed")

    ui.set_input(add, "a", "10")
    expect(ui.output_value(add, "out")).to_have_text('"13.5"')
    expect(ui.output_value(mul, "out")).to_have_text('"54"')
    shot("07-propagated")
