"""
The module list snapshot: what ships with funcnodes_tw, and the maintainer
script that builds it (C{scripts/snapshot_modules.py}), run against a local
stand-in for the public list and PyPI's JSON API.
"""

import csv
import importlib.util
import io
import json
import zipfile
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.web.resource import NoResource, Resource
from twisted.web.server import Site
from twisted.web.static import Data

from funcnodes_tw import libraries

pytestmark = pytest.mark.usefixtures("clean_reactor")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "snapshot_modules.py"
REFERENCE_COLUMNS = [
    "package_name", "version", "description", "entry_point__module", "entry_point__shelf",
    "last_updated", "homepage", "source", "summary", "entry_point__external_worker",
    "official", "releases",
]


@pytest.fixture(scope="module")
def snapshot():
    spec = importlib.util.spec_from_file_location("snapshot_modules", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_snapshot_lists_the_catalogue():
    text = libraries.SNAPSHOT.read_text(encoding="utf-8")
    assert next(csv.reader(io.StringIO(text))) == REFERENCE_COLUMNS
    rows = libraries.parse_module_list(text)
    assert {"funcnodes-numpy", "funcnodes-pandas", "funcnodes-plotly"} <= set(rows)
    numpy = rows["funcnodes-numpy"]
    assert numpy["entry_point__module"] == "funcnodes_numpy"
    assert numpy["description"] and numpy["releases"]
    assert "funcnodes-core" not in rows and "funcnodes-react-flow" not in rows


def wheel(name, version, entry_points):
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr(f"{dist}/METADATA", f"Name: {name}\nVersion: {version}\n")
        if entry_points is not None:
            archive.writestr(f"{dist}/entry_points.txt", entry_points)
    return out.getvalue()


def project(base, name, version, entry_points, size=None):
    filename = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    content = wheel(name, version, entry_points)
    files = [{
        "filename": filename,
        "url": f"{base}/files/{filename}",
        "size": size or len(content),
        "upload_time_iso_8601": "2025-02-03T04:05:06Z",
        "yanked": False,
    }]
    data = {
        "info": {
            "name": name,
            "version": version,
            "summary": f"{name} nodes",
            "home_page": None,
            "project_urls": {"Homepage": f"https://example.org/{name}",
                             "Repository": f"https://example.org/{name}/src"},
        },
        "urls": files,
        "releases": {version: files, "0.1": files, "0.0.1": [], "bad version!": files},
    }
    return filename, content, data


class FakePyPI:
    """
    C{/pypi/NAME/json} and C{/files/WHEEL}, and no public list (404).
    """

    async def start(self):
        self.root = Resource()
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(self.root)
        )
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.pypi, self.files = Resource(), Resource()
        self.root.putChild(b"pypi", self.pypi)
        self.root.putChild(b"files", self.files)
        self.root.putChild(b"list.csv", NoResource())
        return self

    def add(self, name, version, entry_points, **kw):
        filename, content, data = project(self.base, name, version, entry_points, **kw)
        folder = Resource()
        folder.putChild(b"json", Data(json.dumps(data).encode(), "application/json"))
        self.pypi.putChild(name.encode(), folder)
        self.files.putChild(filename.encode(), Data(content, "application/zip"))


@pytest_twisted.ensureDeferred
async def test_without_the_public_list_the_snapshot_is_built_from_pypi(
    snapshot, tmp_path, monkeypatch
):
    pypi = await FakePyPI().start()
    try:
        pypi.add("funcnodes-alpha", "1.2",
                 "[funcnodes.module]\nmodule = alpha_nodes\nshelf = alpha_nodes:SHELF\n")
        pypi.add("funcnodes-tool", "2.0", "[console_scripts]\nfn-tool = tool:main\n")
        pypi.add("funcnodes-big", "0.3", None, size=snapshot.WHEEL_LIMIT + 1)
        monkeypatch.setattr(snapshot, "MODULE_LIST_URL", f"{pypi.base}/list.csv")
        monkeypatch.setattr(snapshot, "PYPI_JSON", pypi.base + "/pypi/{name}/json")
        monkeypatch.setattr(snapshot, "OFFICIAL",
                            ("funcnodes-alpha", "funcnodes-tool", "funcnodes-gone", "funcnodes-big"))
        output = tmp_path / "data" / "modules.csv"
        await deferToThread(snapshot.main, ["--output", str(output)])
    finally:
        await pypi.port.stopListening()

    text = output.read_text()
    assert next(csv.reader(io.StringIO(text))) == REFERENCE_COLUMNS
    rows = {row["package_name"]: row for row in csv.DictReader(io.StringIO(text))}
    assert list(rows) == ["funcnodes-alpha", "funcnodes-big"], "no module, no answer: left out"
    alpha = rows["funcnodes-alpha"]
    assert (alpha["entry_point__module"], alpha["entry_point__shelf"]) == (
        "alpha_nodes", "alpha_nodes:SHELF"
    )
    assert alpha["releases"] == "0.1,1.2", "sorted, without empty or invalid releases"
    assert alpha["homepage"] == "https://example.org/funcnodes-alpha"
    assert alpha["source"] == "https://example.org/funcnodes-alpha/src"
    assert alpha["last_updated"] == "2025-02-03T04:05:06Z"
    assert rows["funcnodes-big"]["entry_point__shelf"] == "funcnodes_big:NODE_SHELF"
    # What the worker reads from it.
    parsed = libraries.parse_module_list(text)
    assert parsed["funcnodes-alpha"]["description"] == "funcnodes-alpha nodes"


@pytest_twisted.ensureDeferred
async def test_the_public_list_is_taken_as_it_is(snapshot, tmp_path, monkeypatch):
    public = ",".join(REFERENCE_COLUMNS) + "\nfuncnodes-x,1.0,x,funcnodes_x,,,,,,,True,1.0\n"
    root = Resource()
    root.putChild(b"list.csv", Data(public.encode(), "text/csv"))
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    try:
        monkeypatch.setattr(
            snapshot, "MODULE_LIST_URL", f"http://127.0.0.1:{port.getHost().port}/list.csv"
        )
        output = tmp_path / "modules.csv"
        await deferToThread(snapshot.main, ["--output", str(output)])
    finally:
        await port.stopListening()
    assert output.read_text() == public


def test_nothing_found_writes_nothing(snapshot, tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot, "OFFICIAL", ())
    output = tmp_path / "modules.csv"
    with pytest.raises(SystemExit, match="no packages"):
        snapshot.main(["--pypi-only", "--output", str(output)])
    assert not output.exists()
