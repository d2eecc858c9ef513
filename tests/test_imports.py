"""What a worker imports at startup, and that what it defers still works.

An idle worker should hold only what its first minute needs: no TLS support
(pyOpenSSL) unless a TLS port is used, no multipart parser extras (smart_open,
requests) before the first upload, no pydantic before an external worker
class exists, no development server of the UI package (the reference worker,
aiohttp). Each check is a module lookup in a fresh process, not a timing.
"""

import json
import os
import ssl
import subprocess
import sys
import urllib.request

import pytest_twisted
from twisted.internet.threads import deferToThread

from inprocess import Cert
from workers import free_port, start_worker

#: Modules an idle worker leaves out, by what defers them.
DEFERRED = {
    "OpenSSL": "TLS support: first TLS port",
    "smart_open": "multipart parser: first upload",
    "requests": "multipart parser: first upload",
    "streaming_form_data": "multipart parser: first upload",
    "pydantic": "external worker classes",
    "funcnodes_react_flow.run": "the UI package's development server",
    "funcnodes_worker": "the UI package's development server",
    "aiohttp": "the UI package's development server and setup hook",
    "prometheus_client": "metrics: first GET /metrics",
}

#: The launcher's own startup in a fresh process, until one second after
#: the worker says it is running (its runstate file); prints which of
#: DEFERRED it imported by then.
LAUNCHER = """
import json, sys
from pathlib import Path
from funcnodes_tw import aio, launcher
reactor = aio.install_reactor()
runstate = Path({runstate!r})

def report():
    print("imported:", json.dumps(sorted(m for m in {modules!r} if m in sys.modules)))
    reactor.stop()

def wait():
    if runstate.is_file() and runstate.read_text().startswith("running"):
        reactor.callLater(1, report)
    else:
        reactor.callLater(0.1, wait)

reactor.callWhenRunning(wait)
sys.exit(launcher.main({argv!r}))
"""


def _launch(tmp_path):
    argv = ["--port", "0", "--data-path", str(tmp_path / "data"), "--uuid", "imports"]
    runstate = tmp_path / "config" / "workers" / "worker_imports.runstate"
    code = LAUNCHER.format(modules=sorted(DEFERRED), argv=argv, runstate=str(runstate))
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(tmp_path / "config"))
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("imported: ")]
    assert len(lines) == 1, run.stdout + run.stderr
    return json.loads(lines[0].split(" ", 1)[1])


def test_an_idle_worker_imports_none_of_the_deferred_modules(tmp_path):
    imported = _launch(tmp_path)
    assert imported == [], {name: DEFERRED[name] for name in imported}


def test_the_reactor_and_endpoints_load_without_tls_yet_parse_tls_endpoints(tmp_path):
    code = (
        "import sys\n"
        "from funcnodes_tw import aio, tls\n"
        "reactor = aio.install_reactor()\n"
        "from twisted.internet import endpoints\n"
        "from twisted.internet.endpoints import wrapClientTLS\n"
        "assert 'OpenSSL' not in sys.modules, 'the reactor imported TLS support'\n"
        "assert endpoints.TLSMemoryBIOFactory is None\n"
        "tls.server_from_string(reactor, 'tcp:0')\n"
        "assert 'OpenSSL' not in sys.modules, 'a plain port loaded TLS support'\n"
        f"tls.server_from_string(reactor, 'tls:{tmp_path}:port=0')\n"
        "assert 'OpenSSL' in sys.modules\n"
        "assert endpoints.TLSMemoryBIOFactory is not None\n"
        "from twisted.internet.ssl import optionsForClientTLS\n"
        "plain = endpoints.TCP4ClientEndpoint(reactor, '127.0.0.1', 1)\n"
        "wrapClientTLS(optionsForClientTLS('localhost'), plain)  # held from before\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_hidden_refuses_pyopenssl_only_inside_the_block():
    code = (
        "import sys\n"
        "from funcnodes_tw import tls\n"
        "with tls.hidden():\n"
        "    try:\n"
        "        import OpenSSL\n"
        "    except ImportError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit('not hidden')\n"
        "import OpenSSL.SSL\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest_twisted.inlineCallbacks
def test_ssl_port_of_a_real_worker(tmp_path):
    """The deferred TLS support comes in for C{--listen ssl:...}: HTTPS and the
    registration say so."""
    cert = Cert(tmp_path / "tls")
    port = free_port()
    listen = (
        f"ssl:port={port}:interface=127.0.0.1:privateKey={cert.key_path}:certKey={cert.cert_path}"
    )
    # --listen wins over the --host/--port that start_worker adds.
    worker = yield start_worker("ours", ["-m", "funcnodes_tw", "--listen", listen], tmp_path, port)
    try:
        context = ssl.create_default_context(cafile=str(cert.cert_path))

        def fetch():
            url = f"https://127.0.0.1:{port}/worker"
            with urllib.request.urlopen(url, context=context, timeout=10) as response:
                return json.loads(response.read())

        info = yield deferToThread(fetch)
    finally:
        yield worker.stop()
    assert info["ssl"] is True and info["port"] == port
    assert info["uuid"] == worker.uuid


def test_a_library_that_needs_pyopenssl_on_import_still_loads(tmp_path):
    """Should an upgrade make Twisted or Autobahn import pyOpenSSL without a
    fallback, the hidden load runs again with TLS and warns once: more
    memory, never a failed start."""
    (tmp_path / "needs_tls.py").write_text("import OpenSSL.SSL\nLOADED = True\n")
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from twisted.logger import globalLogPublisher\n"
        "from funcnodes_tw import tls\n"
        "warnings = []\n"
        "globalLogPublisher.addObserver(lambda e: warnings.append(e) if e['log_level'].name == 'warn' else None)\n"
        "def load():\n"
        "    import needs_tls\n"
        "    return needs_tls\n"
        "module = tls.without(load)\n"
        "assert module.LOADED and 'OpenSSL' in sys.modules\n"
        "assert len(warnings) == 1, warnings\n"
        "assert 'needs pyOpenSSL' in warnings[0]['log_format'], warnings[0]\n"
        "def broken():\n"
        "    import no_such_module_here\n"
        "try:\n"
        "    tls.without(broken)\n"
        "except ImportError as exc:\n"
        "    assert exc.name == 'no_such_module_here'\n"
        "else:\n"
        "    raise SystemExit('other import errors must pass through')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
