"""
What clients learn about failures: outside debug mode no tracebacks and no
absolute paths (they show how the server is laid out), but the message and
the exception's type, which the UI shows; the full traceback goes to the
worker's log. Over real sockets with a node that raises (tests/fault_nodes.py).
"""

import json
from pathlib import Path

import pytest
import pytest_twisted

import fault_nodes
from funcnodes_tw import wire
from test_faults import is_event, logged  # noqa: F401 (fixture)
from inprocess import start  # noqa: F401 (fixture)

#: The node's error message names a file on the server.
MESSAGE = "cannot read /srv/secret/data.csv"
#: Where the raising node's code lives: in every frame of its traceback.
NODE_FILE = str(Path(fault_nodes.__file__).resolve())


@pytest_twisted.inlineCallbacks
def raise_in_node(worker):
    """
    The C{node_trigger_error} event a raising node sends, as a client got it.
    """
    client = yield worker.connect()
    yield client.call("add_shelf", src="fault_nodes")
    nid = (yield client.call("add_node", id="faults.raise"))["id"]
    yield client.call("set_io_value", nid=nid, ioid="message", value=MESSAGE)
    event = yield client.wait_for(is_event("node_trigger_error", nid), timeout=5)
    return event["data"]


@pytest_twisted.inlineCallbacks
def test_a_node_error_reaches_clients_without_traceback_or_paths(start, logged):
    worker = yield start(name="errors")
    data = yield raise_in_node(worker)
    assert data["error"] == "cannot read data.csv"
    assert data["tb"] == ["funcnodes_core.node.NodeTriggerError: cannot read data.csv\n"]
    text = json.dumps(data)
    for secret in ("/srv/", NODE_FILE, "site-packages", "Traceback"):
        assert secret not in text
    # The worker's log has it all.
    (logged_text,) = [text for _, text, _ in logged if "Traceback" in text]
    assert MESSAGE in logged_text and NODE_FILE in logged_text


@pytest_twisted.inlineCallbacks
def test_debug_mode_sends_the_whole_traceback(start):
    worker = yield start("--debug", name="errors_debug")
    data = yield raise_in_node(worker)
    assert data["error"] == MESSAGE
    text = "".join(data["tb"])
    assert text.startswith("Traceback (most recent call last)")
    assert NODE_FILE in text and text.endswith(f"NodeTriggerError: {MESSAGE}\n")


@pytest.mark.parametrize(
    "text, public",
    [
        ("No such file: '/etc/fn/secret.txt'", "No such file: 'secret.txt'"),
        ('File "/srv/fn/.venv/lib/x.py", line 3', 'File "x.py", line 3'),
        ("(/tmp/a/b.json)", "(b.json)"),
        (r"C:\Users\me\x.py failed", "x.py failed"),
    ],
)
def test_public_text_keeps_the_file_name_of_absolute_paths(text, public):
    assert wire.public_text(text) == public
    assert wire.public_text(text, debug=True) == text


@pytest.mark.parametrize(
    "text", ["see http://127.0.0.1:9380/message/abc", "application/json a/b/c ./x/y ~/q/r 1/2/3 /root"]
)
def test_public_text_leaves_urls_and_relative_paths_alone(text):
    assert wire.public_text(text) == text


def test_error_replies_and_events_carry_no_paths():
    try:
        open("/nonexistent/fn/state.json")
    except OSError as exc:
        failure = exc
    reply = wire.error(failure, 3)
    assert reply == {"type": "error", "tb": [], "id": 3,
                     "error": "[Errno 2] No such file or directory: 'state.json'"}
    assert "/nonexistent/" in "".join(wire.error(failure, 3, debug=True)["tb"])
    assert wire.public_traceback(failure) == [
        "FileNotFoundError: [Errno 2] No such file or directory: 'state.json'\n"
    ]


def test_notes_stay_on_the_server():
    """
    A node run in a process carries the child's traceback as a note.
    """
    exc = ValueError("bad")
    exc.add_note("Raised in process 12:\nTraceback ...\n  File \"/srv/fn/node.py\"")
    assert wire.public_traceback(exc) == ["ValueError: bad\n"]
