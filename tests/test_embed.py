"""
funcnodes_tw inside an existing Twisted application: the worker's service in
the host's service tree, its resource mounted at C{/fn/} of the host's Site
beside the host's own resources.
"""

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from funcnodes_tw.service import create
from wsclient import connect

pytestmark = pytest.mark.usefixtures("clean_reactor")


def get(url, **kwargs):
    """
    One request on its own connection: nothing lingers on the reactor.
    """
    return treq.get(url, pool=HTTPConnectionPool(reactor, persistent=False), **kwargs)


class HostApp:
    """
    A host application: its own C{/hello}, and a worker at C{/fn/}.
    """

    def __init__(self, tmp_path):
        self.worker = create(
            "embedded",
            data_path=tmp_path / "data",
            workers_dir=tmp_path / "workers",
            clock=reactor,
        )
        self.root = Resource()
        self.root.putChild(b"hello", Data(b"host says hi", "text/plain"))
        self.root.putChild(b"fn", self.worker.resource)

    @pytest_twisted.inlineCallbacks
    def start(self):
        self.worker.startService()
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = yield endpoint.listen(Site(self.root))
        self.worker.listening(self.port.getHost())
        self.base = f"127.0.0.1:{self.port.getHost().port}"

    @pytest_twisted.inlineCallbacks
    def stop(self):
        if self.worker.running:
            yield self.worker.stopService()
        yield self.port.stopListening()


@pytest.fixture
def app(tmp_path):
    app = HostApp(tmp_path)
    pytest_twisted.blockon(app.start())
    yield app
    pytest_twisted.blockon(app.stop())


@pytest_twisted.inlineCallbacks
def test_worker_and_host_share_one_site(app, tmp_path):
    client = yield connect(reactor, f"ws://{app.base}/fn/")
    try:
        assert (yield client.call("uuid")) == "embedded"
        node = yield client.call("add_node", id="add_node")
        assert node["node_id"] == "add_node"
    finally:
        yield client.close()

    hello = yield get(f"http://{app.base}/hello")
    assert (yield treq.content(hello)) == b"host says hi"

    registration = json.loads((tmp_path / "workers" / "worker_embedded.json").read_text())
    assert registration["type"] == "WSWorker"
    assert registration["port"] == app.port.getHost().port
    assert (tmp_path / "workers" / "worker_embedded.runstate").read_text() == "running"


@pytest_twisted.inlineCallbacks
def test_the_ui_is_served_under_the_prefix(app):
    front = yield get(f"http://{app.base}/fn/", allow_redirects=False)
    assert front.code == 302
    location = front.headers.getRawHeaders(b"location")[0].decode()
    assert location == f"static/index.html?worker_url=ws://{app.base}/fn/"
    yield treq.content(front)

    page = yield get(f"http://{app.base}/fn/static/index.html")
    html = yield treq.content(page)
    assert b'src="./funcnodes_react_flow.es.js"' in html
    assert b'"/static/' not in html
    bundle = yield get(f"http://{app.base}/fn/static/funcnodes_react_flow.es.js")
    assert bundle.code == 200
    yield treq.content(bundle)


@pytest_twisted.inlineCallbacks
def test_stop_worker_stops_only_the_worker(app):
    client = yield connect(reactor, f"ws://{app.base}/fn/")
    assert (yield client.call("stop_worker")) is True
    yield client.when_closed()
    assert not app.worker.running
    hello = yield get(f"http://{app.base}/hello")
    assert (yield treq.content(hello)) == b"host says hi"
