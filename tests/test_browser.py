"""Drive the real funcnodes-react-flow UI in headless Chromium against a worker subprocess.

The worker under test is ours (``python -m funcnodes_tw``) unless
``FUNCNODES_TW_BROWSER_TARGET=reference``, which runs the aiohttp reference worker through
``tests/refworker.py`` so the test itself can be validated against known-good behaviour.
Screenshots of every step land in the test's ``tmp_path`` next to ``worker.log``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
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
    venv_without,
    wait_for_port,
    ws_command,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

log = logging.getLogger(__name__)

TARGET = os.environ.get("FUNCNODES_TW_BROWSER_TARGET", "ours")
TOKEN = "browser-Token_2"
REFWORKER = Path(__file__).with_name("refworker.py")


def worker_command(port: int, datadir: Path, worker_uuid: str, target: str = TARGET,
                   python: str = sys.executable) -> list[str]:
    """Command line of the worker under test; both variants take the same options."""
    if target == "reference":
        entry = [str(REFWORKER)]
    elif target == "ours":
        entry = ["-m", "funcnodes_tw"]
    else:
        raise ValueError(f"FUNCNODES_TW_BROWSER_TARGET: expected ours|reference, got {target!r}")
    return [
        python, *entry,
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
def token():
    """The worker's --token: none, unless a test parametrizes one."""
    return None


@contextlib.contextmanager
def running(cmd: list[str], port: int, logfile: Path, env: dict):
    """The worker process of ``cmd``, listening on ``port``; stopped on leaving."""
    log.info("starting worker: %s (log: %s)", cmd, logfile)
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        try:
            wait_for_port(port, proc, timeout=30)
        except (RuntimeError, TimeoutError) as exc:
            tail = logfile.read_text(errors="replace")[-3000:]
            pytest.fail(f"worker did not come up: {exc}\n--- worker.log ---\n{tail}")
        yield proc
    finally:
        stop_process(proc)


@pytest.fixture
def worker(tmp_path, token):
    """Start the worker with a private config dir and yield its port; stop it afterwards."""
    port = free_port()
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(tmp_path / "config"))
    cmd = worker_command(port, tmp_path / "data", uuid.uuid4().hex)
    if token:
        cmd += ["--token", token]
    with running(cmd, port, tmp_path / "worker.log", env):
        if TARGET == "reference":
            # The reference starts with an empty library; ours ships funcnodes-basic.
            ws_command(port, "add_package_dependency", name="funcnodes-basic")
        yield port


@pytest.fixture
def ui_server():
    with StaticUIServer() as server:
        yield server


@pytest.fixture
def files_worker(request):
    """The worker with funcnodes-files active: its File Upload node is the UI's upload control.

    The core UI bundle never calls its own ``upload_file``; only renderer plugins do, and
    funcnodes-files' ``files.upl`` input renderer is the one that ships with FuncNodes.
    """
    pytest.importorskip("funcnodes_files")
    port = request.getfixturevalue("worker")
    ws_command(port, "add_package_dependency", name="funcnodes-files")
    return port


def test_build_and_wire_graph_in_ui(chromium, worker, ui_server, tmp_path):
    """Add, edit and wire nodes purely through the UI and read results back from the page."""
    run_in_thread(_drive_ui, chromium, ui_server.url(worker), tmp_path, timeout=120)


def test_large_value_through_http_fallback(chromium, worker, ui_server, tmp_path):
    """A value over 1 MiB travels both ways over HTTP, and the page shows what it fetched."""
    scenario = functools.partial(_large_value_scenario, worker_port=worker)
    run_in_thread(_drive_ui, chromium, ui_server.url(worker), tmp_path, scenario, timeout=120)


@pytest.mark.skipif(TARGET == "reference", reason="the reference worker has no token")
@pytest.mark.parametrize("token", [TOKEN])
def test_ui_opened_with_a_token(chromium, worker, token, tmp_path):
    """``http://host:port/?token=T`` lands on the worker's UI, which connects and moves a
    value over 1 MiB through ``/?token=T/message/``; the token never reaches the log."""
    scenario = functools.partial(_large_value_scenario, worker_port=worker, token=token)
    url = f"http://127.0.0.1:{worker}/?token={token}"
    run_in_thread(_drive_ui, chromium, url, tmp_path, scenario, timeout=120)
    log = (tmp_path / "worker.log").read_text()
    assert "GET /?token=<redacted> HTTP/1.1" in log
    assert token not in log


def test_upload_file_from_page(chromium, files_worker, ui_server, tmp_path):
    """A file chosen in the page's upload control lands byte for byte in the worker's files/."""
    scenario = functools.partial(_upload_scenario, files_dir=tmp_path / "data" / "files")
    run_in_thread(_drive_ui, chromium, ui_server.url(files_worker), tmp_path, scenario,
                  timeout=120)


def _drive_ui(chromium: str, url: str, shots: Path, scenario=None):
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
                (scenario or _scenario)(FuncNodesUI(page), expect, url, shot)
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


# --------------------------------------------------------------------------- large values

#: 80 000 keys: about 1.4 MB of JSON either way, over the worker's default 1 MiB limit
#: and over the UI's 1e6-byte limit for sending over the socket.
BIG_KEYS = 80_000
#: The start of the dict's JSON, compact (orjson) or with the separators of json.dumps.
BIG_PREVIEW = re.compile(r'k000000\\?":\s?0,\s?\\?"k000001\\?":\s?1,')


def _large_value_scenario(ui: FuncNodesUI, expect, url: str, shot, worker_port: int,
                          token: str | None = None):
    """Paste 1.4 MB of JSON into a JSON Input node, then reload the page.

    1. The UI sends the oversized ``set_io_value`` via ``POST /message/``; the worker's
       result (the 1.4 MB string) comes back as a ``large_message`` hint on the socket,
       and the page fetches ``GET /message/<msg_id>`` by itself.
    2. The node's output (a dict of 80 000 keys) arrives as a binary preview frame larger
       than the limit, which only bounds what clients send.
    3. After a reload the output's preview is only available through ``get_io_value``,
       whose 1.3 MB result again comes as a hint: what the page shows was fetched.

    With a ``token``, ``url`` is the worker's own ``/?token=T``: the UI gets a worker URL
    with the token, from which it derives ``/?token=T/message/...``.
    """
    page = ui.page
    big = {f"k{i:06d}": i for i in range(BIG_KEYS)}
    text = json.dumps(big)
    assert len(text) > 1_048_576 * 1.3

    hints: list[str] = []
    messages = []  # responses of the page's requests to <worker>/message/...

    def on_frame(payload):
        if isinstance(payload, str) and len(payload) < 1000 and "large_message" in payload:
            hint = json.loads(payload)
            if hint.get("type") == "large_message":
                hints.append(hint["msg_id"])

    page.on("websocket", lambda ws: ws.on("framereceived", on_frame))
    page.on("response", lambda r: messages.append(r) if "/message/" in r.url else None)
    sockets, refused = [], []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    page.on("response", lambda r: refused.append(r.url) if r.status == 401 else None)
    http_base = f"http://127.0.0.1:{worker_port}/" + (f"?token={token}/" if token else "")
    fetch_url = re.compile(rf"^{re.escape(http_base)}message/([0-9a-f-]{{36}})$")

    def fetched():
        """(msg_id, parsed JSON) of every GET /message/<id> so far; all must be 200s."""
        out = []
        for response in messages:
            if response.request.method != "GET":
                continue
            match = fetch_url.match(response.url)
            assert match, f"unexpected fetch {response.url}"
            assert response.status == 200, f"{response.url}: {response.status}"
            out.append((match.group(1), response.json()))
        return out

    if token:
        _follow_link_from_elsewhere(page, url)
        expect(page).to_have_url(
            f"http://127.0.0.1:{worker_port}/static/index.html?token={token}"
            f"&worker_url=ws://127.0.0.1:{worker_port}/%3Ftoken%3D{token}"
        )
    else:
        page.goto(url)
    ui.open_library()
    expect(ui.shelf("basics")).to_be_visible()
    if token:
        assert sockets == [f"ws://127.0.0.1:{worker_port}/?token={token}"]
    node = ui.place_node("input.json", "JSON Input")
    shot("11-json-node")

    with page.expect_response(
        lambda r: r.request.method == "GET" and "/message/" in r.url, timeout=20_000
    ):
        ui.paste_input(node, "input", text)
    posts = [r for r in messages if r.request.method == "POST"]
    assert [(r.url, r.status) for r in posts] == [
        (f"{http_base}message/", 200)
    ], "the UI should send the 1.4 MB set_io_value over POST /message/"
    [(msg_id, message)] = fetched()
    assert msg_id in hints, "fetched a message the worker never pointed to"
    assert message["type"] == "result" and message["result"] == text
    expect(ui.output_value(node, "json")).to_contain_text(BIG_PREVIEW, timeout=15_000)
    shot("12-large-value-set")

    messages.clear()
    hints.clear()
    page.reload()
    expect(ui.output_value(node, "json")).to_contain_text(BIG_PREVIEW, timeout=15_000)
    shot("13-large-value-after-reload")
    after_reload = fetched()
    assert {msg_id for msg_id, _ in after_reload} <= set(hints)
    # The output's value reached this page only as a fetched get_io_value result.
    assert any(m.get("type") == "result" and m.get("result") == big for _, m in after_reload), (
        "no fetched message carried the output's value: "
        + ", ".join(str(m.get("type")) for _, m in after_reload)
    )
    assert not refused, f"refused: {refused}"


def _follow_link_from_elsewhere(page, url: str):
    """Open ``url`` the way a link in a chat or a mail does: from a page of another site,
    for which the browser holds back the worker's SameSite=Strict cookie."""
    page.route(
        "http://elsewhere.test/",
        lambda route: route.fulfill(content_type="text/html", body=f'<a href="{url}">worker</a>'),
    )
    page.goto("http://elsewhere.test/")
    page.click("a")


# --------------------------------------------------------------------------- uploads

UPLOAD_NAME = "Messdaten März 1.bin"
UPLOAD_CONTENT = b"line 1\r\nline 2\n\x00\xff\xfe binary \xe2\x82 tail" * 100


def _upload_scenario(ui: FuncNodesUI, expect, url: str, shot, files_dir: Path):
    """Choose a file in funcnodes-files' File Upload node, the UI's upload control.

    The control POSTs ``multipart/form-data`` to ``/upload/`` and sets the node's
    ``input_data`` to the returned path; the node then reads the file (and, with ``save``
    ticked, keeps it in ``files/``; unticked it would delete it after reading).
    """
    page = ui.page
    page.goto(url)
    ui.open_library()
    expect(ui.shelf("Files")).to_be_visible()
    node = ui.place_node("files.upl", "File Upload")
    # The plugin's renderer replaces the plain field with an upload button.
    expect(node.get_by_role("button", name="Upload File")).to_be_visible()
    # A controlled checkbox: it shows the value the worker echoes back, so click and wait.
    ui.checkbox(node, "save").click()
    expect(ui.checkbox(node, "save")).to_be_checked()
    shot("21-upload-node")

    with page.expect_response(lambda r: r.url.endswith("/upload/")) as uploaded:
        ui.file_input(node, "input_data").set_input_files(
            files=[{"name": UPLOAD_NAME, "mimeType": "application/octet-stream",
                    "buffer": UPLOAD_CONTENT}]
        )
    response = uploaded.value
    assert response.request.method == "POST"
    assert response.request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert response.status == 200, response.text()
    assert response.json() == {"file": UPLOAD_NAME}

    # The node got the returned path, read the whole file and describes it.
    expect(ui.output_value(node, "data")).to_have_text(
        f'"DataStructure({len(UPLOAD_CONTENT)},application/octet-stream)"'
    )
    expect(ui.output_value(node, "file")).to_contain_text(UPLOAD_NAME)
    shot("22-uploaded")
    assert (files_dir / UPLOAD_NAME).read_bytes() == UPLOAD_CONTENT
    assert [p.relative_to(files_dir) for p in files_dir.rglob("*")] == [Path(UPLOAD_NAME)]


# --------------------------------------------------------------------------- embedding

EMBEDDED_APP = Path(__file__).with_name("embedded_app.py")


@pytest.fixture
def embedded_app(tmp_path):
    """A host application (tests/embedded_app.py) serving a worker at /fn/."""
    port = free_port()
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(tmp_path / "config"))
    logfile = tmp_path / "app.log"
    cmd = [sys.executable, str(EMBEDDED_APP), str(port), str(tmp_path / "data"),
           str(tmp_path / "workers")]
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, proc, timeout=30)
        yield port
    finally:
        stop_process(proc)


def test_ui_on_a_worker_mounted_in_a_host_application(chromium, embedded_app, tmp_path):
    """
    The worker's own page at /fn/ (redirected to /fn/static/index.html with
    worker_url=ws://host:port/fn/) drives the mounted worker like a standalone one.
    """
    url = f"http://127.0.0.1:{embedded_app}/fn/"
    run_in_thread(_drive_ui, chromium, url, tmp_path, timeout=120)


# --------------------------------------------------------------------------- installing


@pytest.fixture
def numpy_free_worker(tmp_path):
    """A worker whose environment lacks funcnodes-numpy and whose module list is the shipped
    snapshot: a fresh config dir (no cached list) and ``--no-refresh-module-list``.

    The venv links this one's packages except funcnodes-numpy (and funcnodes-pandas, which
    needs it); its pip gets a constraints file pinning what is there, so the install adds
    funcnodes-numpy and nothing else, and cannot replace a linked package. ``PIP_NO_CACHE_DIR``
    makes pip download it, as on a new machine.
    """
    venv = tmp_path / "venv"
    constraints = venv_without(venv, "funcnodes-numpy")
    python = str(venv / "bin" / "python")
    probe = subprocess.run(
        [python, "-c", "import importlib.util as u, funcnodes_tw;"
                       " print(u.find_spec('funcnodes_numpy'))"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "None", "funcnodes-numpy is visible in the test venv"
    port = free_port()
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(tmp_path / "config"),
               PIP_CONSTRAINT=str(constraints), PIP_NO_CACHE_DIR="1")
    cmd = worker_command(port, tmp_path / "data", uuid.uuid4().hex, "ours", python)
    with running(cmd + ["--no-refresh-module-list"], port, tmp_path / "worker.log", env):
        yield port


@pytest.mark.skipif(TARGET == "reference", reason="the reference always downloads the list")
def test_find_and_install_numpy_from_the_ui(chromium, numpy_free_worker, tmp_path):
    """A new user finds funcnodes-numpy in "Manage Libraries" (no network for the list),
    installs it with "Add", follows readable progress in the status bar, and uses a node of
    the numpy shelf that appears."""
    shown: list[tuple[str, float]] = []
    said: list[dict] = []
    scenario = functools.partial(_install_scenario, shown=shown, said=said)
    url = f"http://127.0.0.1:{numpy_free_worker}/"
    run_in_thread(_drive_ui, chromium, url, tmp_path, scenario, timeout=300)
    (tmp_path / "statusbar.json").write_text(json.dumps(shown, indent=1))
    log.info("status bar during the install: %s", shown)

    worker_log = (tmp_path / "worker.log").read_text()
    # pip did print what must not reach a client: the filter had something to remove.
    assert "Requirement already satisfied" in worker_log
    assert "Successfully installed funcnodes-numpy" in worker_log
    # The dialog's list came from the shipped snapshot: nothing was downloaded to the cache.
    assert not (tmp_path / "config" / "cache" / "funcnodes_modules.csv").exists()


#: Every state of the status bar (text, width of the bar) from the page's start on.
STATUSBAR_RECORDER = """
window.__statusbar = [];
new MutationObserver(() => {
  const text = document.querySelector(".statusbar-message");
  const bar = document.querySelector(".statusbar-progressbar");
  if (!text || !bar) return;
  const seen = window.__statusbar, last = seen[seen.length - 1];
  const now = [text.textContent, bar.style.width];
  if (!last || last[0] !== now[0] || last[1] !== now[1]) seen.push(now);
}).observe(document, {subtree: true, childList: true, characterData: true, attributes: true,
                      attributeFilter: ["style"]});
"""

INSTALLED = "Package dependency added funcnodes-numpy"
#: What a status bar text must not carry: paths, addresses, pip's noise.
UNREADABLE = re.compile(r"[/\\]|site-packages|already satisfied|Looking in|WARNING")


def _install_scenario(ui: FuncNodesUI, expect, url: str, shot, shown: list, said: list):
    """Open "Manage Libraries", add funcnodes-numpy, watch the status bar, use np.add.

    ``shown`` gets the status bar's states from the click to the end of the install as
    (text, progress 0..1), ``said`` the worker's ``progress`` messages.
    """
    page = ui.page

    def on_frame(payload):
        if isinstance(payload, str) and payload.startswith('{"type":"progress"'):
            said.append(json.loads(payload))

    page.on("websocket", lambda ws: ws.on("framereceived", on_frame))
    page.add_init_script(STATUSBAR_RECORDER)
    page.goto(url)
    ui.open_library()
    expect(ui.shelf("basics")).to_be_visible()
    expect(ui.shelf("numpy")).to_have_count(0)

    page.get_by_role("button", name="Manage Libraries").click()
    dialog = page.get_by_role("dialog")
    module = dialog.locator(".addable-module").filter(
        has=page.locator(".module-name", has_text=re.compile(r"^funcnodes-numpy\b"))
    )
    expect(module).to_have_count(1)
    section = module.evaluate(
        "el => { let e = el; while (e && e.tagName !== 'H3') e = e.previousElementSibling;"
        " return e && e.textContent; }"
    )
    assert section == "Available", f"funcnodes-numpy listed under {section!r}"
    shot("31-manage-libraries")

    before = page.evaluate("window.__statusbar.length")
    module.get_by_role("button", name="Add").click()
    expect(page.locator(".statusbar-message")).to_have_text(INSTALLED, timeout=180_000)
    shot("32-installed")
    states = page.evaluate("window.__statusbar")[before:]
    shown.extend((text, float(width.rstrip("%")) / 100) for text, width in states)

    texts = list(dict.fromkeys(text for text, _ in shown))
    values = [value for _, value in shown]
    assert texts[0] == "Add package dependency funcnodes-numpy", texts
    assert texts[-1] == INSTALLED and values[-1] == pytest.approx(1.0)
    assert values == sorted(values), f"the bar went back: {shown}"
    assert any(0 < value < 1 for value in values), f"the bar did not move: {shown}"
    assert 3 <= len(texts) <= 8, texts
    for text in texts:
        assert not UNREADABLE.search(text) and len(text) <= 120, text
    # The page shows what the worker said, and the worker said each step.
    told = [m["message"] for m in said]
    assert set(texts) <= set(told), (texts, told)
    assert any(t.startswith("Installing funcnodes-numpy: downloading funcnodes-numpy ")
               for t in told), told
    assert [m["progress"] for m in said] == sorted(m["progress"] for m in said), said

    # The dialog closed itself; the library panel is still open.
    expect(ui.shelf("numpy")).to_be_visible()
    node = ui.place_node("np.add", "add")
    ui.set_input(node, "x1", "2")
    ui.set_input(node, "x2", "3.5")
    expect(ui.output_value(node, "add")).to_have_text('"5.5"')
    shot("33-numpy-node")
