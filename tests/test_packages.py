"""
Packages: real pip runs against a local FuncNodes module, progress messages,
failures that leave the worker intact, the start's pip work after the port
is up, the offline module list and local scripts.

No network: pip runs with C{--no-index} and local wheels of a tiny module
(C{tinyfn}, built once per session), and installs into a throwaway venv
that sees this venv's packages through a C{.pth} file, so nothing lands in
the project's own environment. The machine's pip configuration is ignored
(C{PIP_CONFIG_FILE=/dev/null}).
"""

import gc
import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from uuid import uuid4

import pytest
import pytest_twisted
from funcnodes_core._setup import AVAILABLE_MODULES
from funcnodes_core.node import PlaceHolderNode
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import Data

from funcnodes_tw import commands, libraries, packages, persistence, pipsteps
from funcnodes_tw.commands import library
from funcnodes_tw.persistence import WorkerFiles
from funcnodes_tw.settings import Settings
from funcnodes_tw.service import WorkerService, create
from funcnodes_tw.worker import Worker

pytestmark = pytest.mark.usefixtures("clean_reactor")

TINY_SOURCE = '''
import funcnodes_core as fn

VERSION = "{version}"


@fn.NodeDecorator("tinyfn.double", name="Double")
def double(x: int = 1) -> int:
    return 2 * x


NODE_SHELF = fn.Shelf(name="tinyfn", nodes=[double], description="tiny test module")
'''

TINY_PROJECT = '''
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "tinyfn"
version = "{version}"
description = "A tiny FuncNodes module for tests"

[project.entry-points."funcnodes.module"]
module = "tinyfn"
shelf = "tinyfn:NODE_SHELF"
'''


#: The defaults every worker config has, switched off: tests never upgrade these.
NO_CORE_UPDATES = {"funcnodes": False, "funcnodes-core": False, "funcnodes-worker": False}


def hermetic_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


@pytest.fixture(scope="session")
def wheels(tmp_path_factory):
    """
    C{tinyfn} 0.1 and 0.2 wheels in one folder; C{broken} also has a 0.3
    wheel that is not a zip, so upgrading from there fails.
    """
    root = tmp_path_factory.mktemp("tinyfn")
    sources = []
    for version in ("0.1", "0.2"):
        src = root / f"src-{version}"
        (src / "tinyfn").mkdir(parents=True)
        (src / "pyproject.toml").write_text(TINY_PROJECT.format(version=version))
        (src / "tinyfn" / "__init__.py").write_text(TINY_SOURCE.format(version=version))
        sources.append(str(src))
    good = root / "wheels"
    for src in sources:  # one version per pip resolution
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-build-isolation",
             "--no-deps", "-w", str(good), src],
            check=True,
            env=hermetic_env(),
        )
    broken = root / "broken"
    broken.mkdir()
    for wheel in good.iterdir():
        (broken / wheel.name).write_bytes(wheel.read_bytes())
    (broken / "tinyfn-0.3-py3-none-any.whl").write_bytes(b"not a zip file")
    return {"good": good, "broken": broken}


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path):
    """
    pip without the machine's config; the module list cache in tmp.
    """
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    cache = tmp_path / "config" / "cache" / "funcnodes_modules.csv"
    monkeypatch.setattr(packages, "module_list_path", lambda: cache)
    monkeypatch.setattr(packages, "MODULE_LIST", packages.ModuleListRefresh())
    yield cache
    _forget_tinyfn()


def _forget_tinyfn():
    for name in [n for n in sys.modules if n == "tinyfn" or n.startswith("tinyfn.")]:
        del sys.modules[name]
    AVAILABLE_MODULES.pop("tinyfn", None)
    importlib.invalidate_caches()


def make_venv(folder):
    """
    A venv without pip of its own: this venv's site-packages (pip, setuptools,
    funcnodes-core) are visible to it through a .pth file; installs go to its
    own site-packages.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = folder / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return site


@pytest.fixture
def venv(tmp_path, monkeypatch):
    """
    A throwaway venv on this process's sys.path, as if the worker ran in it.
    """
    folder = tmp_path / "venv"
    site = make_venv(folder)
    monkeypatch.syspath_prepend(str(site))
    return folder, site


def pip_into(venv_folder, *args):
    subprocess.run(
        [str(venv_folder / "bin" / "python"), "-m", "pip", "install", "-q", *args],
        check=True,
        env=hermetic_env(),
    )
    importlib.invalidate_caches()


class Recorder:
    """
    An outlet that keeps every message the worker broadcasts.
    """

    def __init__(self):
        self.messages = []

    def broadcast(self, message, hold=False):
        self.messages.append(message)

    def broadcast_binary(self, payload, header, hold=False):
        pass

    def progress(self):
        return [
            (m["message"], m["status"], m["progress"], m["blocking"])
            for m in self.messages
            if m["type"] == "progress"
        ]

    def events(self, name=None):
        return [
            m for m in self.messages
            if m["type"] == "workerevent" and (name is None or m["event"] == name)
        ]


def new_worker(tmp_path, config=None, uuid="pkgworker"):
    files = WorkerFiles(uuid, root=tmp_path / "workers")
    files.create()
    worker = Worker(files, uuid, clock=reactor)
    worker.outlet = Recorder()
    worker.config = dict(config or {})
    return worker


def venv_config(venv, wheels, folder="good", **more):
    return {
        "env_path": str(venv[0]),
        "pip_args": ["--no-index", "--find-links", str(wheels[folder])],
        **more,
    }


def run(worker, cmd, /, **kwargs):
    return commands.run(worker, cmd, kwargs)


@pytest.fixture
def spawns(monkeypatch):
    """
    Every spawnProcess of the reactor, recorded; pip still runs for real.
    """
    calls = []
    real = reactor.spawnProcess

    def recording(protocol, executable, args=(), *rest, **kwargs):
        calls.append(list(args))
        return real(protocol, executable, args, *rest, **kwargs)

    monkeypatch.setattr(reactor, "spawnProcess", recording)
    return calls


class FakeProcess:
    """
    A pip that is never run: it prints C{lines} and exits with C{code}.
    """

    def __init__(self, lines=(), code=0):
        self.lines = lines
        self.code = code
        self.calls = []

    def __call__(self, protocol, executable, args=(), *rest, **kwargs):
        self.calls.append(list(args))
        protocol.makeConnection(self)
        reactor.callLater(0, self._run, protocol)
        return self

    def _run(self, protocol):
        for line in self.lines:
            protocol.childDataReceived(1, line.encode() + b"\n")
        ended = ProcessDone(0) if self.code == 0 else ProcessTerminated(exitCode=self.code)
        protocol.processEnded(Failure(ended))

    def closeStdin(self):
        pass

    def signalProcess(self, signal):
        pass


def tinyfn_version():
    try:
        return importlib.metadata.version("tinyfn")
    except importlib.metadata.PackageNotFoundError:
        return None


# region installing


@pytest_twisted.ensureDeferred
async def test_install_from_a_local_wheel_with_progress_in_order(tmp_path, venv, wheels, spawns):
    worker = new_worker(tmp_path, venv_config(venv, wheels))
    assert tinyfn_version() is None

    assert await run(worker, "add_package_dependency", name="tinyfn") is None

    assert len(spawns) == 1
    argv = spawns[0]
    assert argv[:6] == [
        str(venv[0] / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "raw"
    ]
    assert argv[-1] == "tinyfn" and "--upgrade" not in argv
    # Installed into the throwaway venv, not the project's.
    assert (venv[1] / "tinyfn" / "__init__.py").exists()
    assert not os.path.exists(os.path.join(sysconfig.get_paths()["purelib"], "tinyfn"))
    assert tinyfn_version() == "0.2", "the newest the index has"

    # pip's output (paths, indexes) became a few steps: none from a local
    # wheel is a download.
    assert worker.outlet.progress() == [
        ("Add package dependency tinyfn", "info", 0.0, True),
        ("Installing tinyfn: resolving", "info", 0.1, True),
        ("Installing tinyfn: installing tinyfn", "info", 0.75, True),
        ("Adding tinyfn to the library", "info", 0.9, True),
        ("Package dependency added tinyfn", "success", 1, False),
    ]
    last = worker.outlet.messages[-1]
    assert last["type"] == "workerevent" and last["event"] == "fullsync"

    assert worker.nodespace.lib.has_node_id("tinyfn.double")
    assert worker.package_dependencies["tinyfn"] == {"package": "tinyfn", "version": None}
    assert worker.worker_json()["package_dependencies"]["tinyfn"]["version"] is None
    node = await run(worker, "add_node", id="tinyfn.double")
    assert node.node_id == "tinyfn.double"


@pytest_twisted.ensureDeferred
async def test_entry_point_module_loads_as_a_shelf_with_add_shelf(tmp_path, venv, wheels):
    pip_into(venv[0], "--no-index", "--find-links", str(wheels["good"]), "tinyfn==0.1")
    worker = new_worker(tmp_path)
    module = libraries.find_module("tinyfn")
    assert set(module.entry_points) >= {"module", "shelf"}
    assert libraries.shelf_of(module).name == "tinyfn"
    assert await run(worker, "add_shelf", src="tinyfn") is True
    assert worker.nodespace.lib.has_node_id("tinyfn.double")
    assert worker.outlet.progress() == [
        ("Adding shelf", "info", 0.0, True),
        ("Shelf added", "success", 1, False),
    ]
    available = await run(worker, "get_available_modules")
    tiny = [m for m in available["installed"] if m["name"] == "tinyfn"]
    assert tiny and tiny[0]["version"] == "0.1"


def test_entry_points_of_the_importlib_metadata_backport_load_too():
    # dask imports the backport, whose finder then answers the standard
    # library's scan with its own EntryPoint class; funcnodes-core loads only
    # the standard library's, so a module it had not imported came back with
    # an EntryPoint for a shelf. A fresh process, so the module is not imported.
    pytest.importorskip("importlib_metadata")
    script = (
        "import importlib_metadata, sys\n"
        "from funcnodes_core.lib import Shelf\n"
        "from funcnodes_tw import libraries\n"
        "assert 'funcnodes_basic' not in sys.modules\n"
        "module = libraries.find_module('funcnodes-basic')\n"
        "shelf = libraries.shelf_of(module)\n"
        "assert isinstance(shelf, Shelf), repr(shelf)\n"
        "assert module.module is sys.modules['funcnodes_basic'], module.module\n"
        "print(shelf.name)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "basics"


@pytest_twisted.ensureDeferred
async def test_version_specifiers_pin_and_upgrade(tmp_path, venv, wheels, spawns):
    worker = new_worker(tmp_path, venv_config(venv, wheels))
    await run(worker, "add_package_dependency", name="tinyfn", version="0.1")
    assert tinyfn_version() == "0.1"
    assert spawns[-1][-1] == "tinyfn==0.1"
    assert worker.package_dependencies["tinyfn"]["version"] == "==0.1"
    assert ("Installing tinyfn: resolving", "info", 0.1, True) in worker.outlet.progress()

    # Satisfied: no pip.
    await run(worker, "add_package_dependency", name="tinyfn", version="<0.2")
    assert len(spawns) == 1

    worker.outlet.messages.clear()
    await run(worker, "add_package_dependency", name="tinyfn", version=">=0.2")
    assert tinyfn_version() == "0.2"
    assert "--upgrade" in spawns[-1] and spawns[-1][-1] == "tinyfn>=0.2"
    progress = worker.outlet.progress()
    assert progress[1] == ("Upgrading tinyfn: resolving", "info", 0.1, True)
    assert progress[-1] == ("Package dependency added tinyfn", "success", 1, False)
    assert worker.package_dependencies["tinyfn"]["version"] == ">=0.2"


@pytest_twisted.ensureDeferred
async def test_already_installed_spawns_no_pip(tmp_path, monkeypatch):
    fake = FakeProcess()
    monkeypatch.setattr(reactor, "spawnProcess", fake)
    worker = new_worker(tmp_path)
    installed = importlib.metadata.version("funcnodes-basic")
    for version in (None, "latest", "", installed, f">={installed}"):
        worker.outlet.messages.clear()
        await run(worker, "add_package_dependency", name="funcnodes-basic", version=version)
        assert [m for m, *_ in worker.outlet.progress()] == [
            "Add package dependency funcnodes-basic",
            "Adding funcnodes-basic to the library",
            "Package dependency added funcnodes-basic",
        ]
    assert fake.calls == []
    assert worker.nodespace.lib.has_node_id("input.int")


@pytest_twisted.ensureDeferred
async def test_library_commands_do_not_rescan_an_unchanged_environment(tmp_path, monkeypatch):
    """
    funcnodes-core's module scan (a full gc.collect for each module it never
    imported, with the reactor blocked) runs again only when the environment
    changed, or after pip ran.
    """
    environment = ["before"]
    monkeypatch.setattr(libraries, "_environment_key", lambda: tuple(environment))
    worker = new_worker(tmp_path)
    await run(worker, "add_package_dependency", name="funcnodes-basic")
    scans, collections = [], []
    scan = libraries.setup
    monkeypatch.setattr(libraries, "setup", lambda: (scans.append(1), scan())[1])
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: (collections.append(1), collect(*a))[1])
    for _ in range(2):
        await run(worker, "remove_shelf", src="funcnodes_basic")
        await run(worker, "add_shelf", src="funcnodes_basic")
        await run(worker, "add_package_dependency", name="funcnodes-basic")
        await run(worker, "remove_package_dependency", name="funcnodes-basic")
        await run(worker, "add_package_dependency", name="funcnodes-basic")
        await run(worker, "get_available_modules")
    assert (scans, collections) == ([], [])
    assert worker.nodespace.lib.has_node_id("input.int")

    environment.append("a package was installed")
    await run(worker, "get_available_modules")
    await run(worker, "add_shelf", src="funcnodes_basic")
    assert len(scans) == 1
    packages.refresh_discovery()
    assert len(scans) == 2


def test_the_environment_key_changes_with_sys_path_and_its_folders(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    site.mkdir()
    os.utime(site, ns=(0, 0))
    before = libraries._environment_key()
    monkeypatch.syspath_prepend(str(site))
    on_path = libraries._environment_key()
    assert on_path != before
    assert libraries._environment_key() == on_path
    (site / "tinyfn-0.1.dist-info").mkdir()
    assert libraries._environment_key() != on_path


@pytest.mark.parametrize(
    "name, version",
    [("-r/etc/passwd", None), ("pkg @ http://example.com/x.whl", None), ("../x", None),
     ("funcnodes-basic", "not a version!"), ("--index-url=http://evil", None)],
)
@pytest_twisted.ensureDeferred
async def test_names_and_versions_pip_would_misread_are_refused(
    tmp_path, monkeypatch, name, version
):
    fake = FakeProcess()
    monkeypatch.setattr(reactor, "spawnProcess", fake)
    worker = new_worker(tmp_path)
    with pytest.raises(ValueError):
        await run(worker, "add_package_dependency", name=name, version=version)
    assert fake.calls == []
    assert worker.outlet.progress()[-1][1:] == ("error", 0.0, True)
    assert worker.package_dependencies == {}


@pytest_twisted.ensureDeferred
async def test_failed_pip_leaves_worker_and_graph_intact(tmp_path, spawns):
    worker = new_worker(tmp_path, {"pip_args": ["--no-index"]})
    await run(worker, "add_package_dependency", name="funcnodes-basic")
    node = await run(worker, "add_node", id="input.int")
    library_before = worker.nodespace.lib.full_serialize()
    deps_before = dict(worker.package_dependencies)
    worker.outlet.messages.clear()

    started = time.monotonic()
    with pytest.raises(packages.InstallError) as error:
        await run(worker, "add_package_dependency", name="no-such-package-tw")
    assert time.monotonic() - started < 30

    # The running interpreter's pip (no env_path), which found nothing.
    assert spawns[-1][:3] == [sys.executable, "-m", "pip"]
    # One short sentence, in the reply and the status bar alike.
    assert str(error.value) == "no package no-such-package-tw found in the package index"
    assert worker.outlet.progress() == [
        ("Add package dependency no-such-package-tw", "info", 0.0, True),
        ("Installing no-such-package-tw: resolving", "info", 0.1, True),
        ("Could not install no-such-package-tw: no package no-such-package-tw found in the"
         " package index", "error", 0.0, True),
    ]
    assert worker.outlet.messages[-1]["event"] == "fullsync"

    assert [n.uuid for n in worker.nodespace.nodes] == [node.uuid]
    assert worker.nodespace.lib.full_serialize() == library_before
    assert worker.package_dependencies == deps_before
    assert await run(worker, "uuid") == "pkgworker"


@pytest_twisted.ensureDeferred
async def test_pip_runs_one_at_a_time_and_can_time_out(tmp_path, monkeypatch):
    started = []

    class Hanging(FakeProcess):
        def __call__(self, protocol, executable, args=(), *rest, **kwargs):
            started.append(protocol)
            self.calls.append(list(args))
            protocol.makeConnection(self)
            return self

        def signalProcess(self, signal):
            reactor.callLater(0, started[-1].processEnded, Failure(ProcessDone(0)))

    fake = Hanging()
    monkeypatch.setattr(reactor, "spawnProcess", fake)
    config = {"pip_timeout": 0.2}
    installer = packages.Installer()
    first = installer.pip(config, ["install", "a"])
    second = installer.pip(config, ["install", "b"])
    await deferLater(reactor, 0.05, lambda: None)
    assert len(fake.calls) == 1, "the second pip waits for the first"
    with pytest.raises(packages.InstallError, match="did not finish within 0.2 s"):
        await first
    with pytest.raises(packages.InstallError, match="did not finish"):
        await second
    assert len(fake.calls) == 2
    await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_stopping_worker_lets_pip_finish_then_ends_it(tmp_path, monkeypatch):
    signals = []

    class Hanging(FakeProcess):
        def __call__(self, protocol, executable, args=(), *rest, **kwargs):
            self.calls.append(list(args))
            self.protocol = protocol
            protocol.makeConnection(self)
            return self

        def signalProcess(self, signal):
            signals.append(signal)
            reactor.callLater(0, self.protocol.processEnded, Failure(ProcessDone(0)))

    monkeypatch.setattr(reactor, "spawnProcess", Hanging())
    installer = packages.Installer()
    running = installer.pip({}, ["install", "a"])
    queued = installer.pip({}, ["install", "b"])
    started = time.monotonic()
    await installer.close(grace=0.2)
    assert 0.15 < time.monotonic() - started < 2
    assert signals == ["TERM"]
    with pytest.raises(defer.CancelledError):
        await running
    with pytest.raises(packages.InstallError, match="stopping"):
        await queued
    await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_update_loads_the_state_even_when_a_package_fails(tmp_path, monkeypatch):
    fake = FakeProcess([
        "ERROR: Could not find a version that satisfies the requirement no-such-package-tw"
        " (from versions: none)",
        "ERROR: No matching distribution found for no-such-package-tw",
    ], code=1)
    monkeypatch.setattr(reactor, "spawnProcess", fake)
    source = new_worker(tmp_path, uuid="source")
    await run(source, "add_package_dependency", name="funcnodes-basic")
    node = await run(source, "add_node", id="input.int")
    state = source.save_state()

    worker = new_worker(tmp_path)
    config = {"package_dependencies": {
        "funcnodes-basic": {"package": "funcnodes-basic", "version": None},
        "no-such-package-tw": {"package": "no-such-package-tw", "version": None},
    }}
    assert await run(worker, "update", config=config, state=state) is None
    assert len(fake.calls) == 1
    assert [n.uuid for n in worker.nodespace.nodes] == [node.uuid]
    assert "no-such-package-tw" not in worker.package_dependencies
    messages = [m for m, *_ in worker.outlet.progress()]
    assert "Package dependency added funcnodes-basic" in messages
    assert messages[-1] == (
        "Could not install no-such-package-tw: no package no-such-package-tw found in the"
        " package index"
    )
    assert worker.outlet.messages[-1]["event"] == "fullsync"


# endregion
# region pip's output as steps

#: Real pip output (stdout and stderr as they came), recorded in scratch
#: venvs: pip 26.3 with --progress-bar raw installing funcnodes-plotly from
#: PyPI; pip 23.2.1 (no raw progress) installing funcnodes-images; a package
#: that does not exist; a version that does not; no network (unshare -n).
RECORDED = Path(__file__).with_name("data") / "pip"


def recorded(name):
    return (RECORDED / f"{name}.txt").read_text().splitlines()


def steps_of(lines):
    said = []
    steps = pipsteps.PipSteps(lambda text, value: said.append((text, value)))
    steps.resolving()
    for line in lines:
        steps.line(line)
    return said


def assert_readable(said):
    values = [value for _, value in said]
    assert values == sorted(values), "the value only rises"
    for text, _ in said:
        assert "/" not in text and "://" not in text and "\\" not in text, text
        assert "already satisfied" not in text and "WARNING" not in text
        assert "Looking in" not in text and len(text) < 120


def test_a_raw_progress_install_reads_as_a_few_steps():
    lines = recorded("install_raw")
    assert len(lines) > 100 and sum("already satisfied" in line for line in lines) > 60
    said = steps_of(lines)
    assert_readable(said)
    assert said[0] == ("resolving", 0.1)
    assert said[1:5] == [
        ("downloading funcnodes-plotly 1.1.2 (1.5 MB)", 0.1),
        ("downloading funcnodes-plotly 1.1.2 (1.5 MB) 17%", 0.153),
        ("downloading funcnodes-plotly 1.1.2 (1.5 MB) 100%", 0.4),
        ("downloading funcnodes-images 0.2.6 (20 kB)", 0.4),
    ]
    assert ("downloading pillow 13.0.0 (7.1 MB) 100%", pytest.approx(0.698, abs=0.001)) in said
    assert said[-1] == ("installing simplejson, pillow and 7 more", 0.75)
    assert all(0.1 <= value < 0.7 for _, value in said[:-1])
    assert len(said) <= 16, "one message per download step, not per line"


def test_an_old_pip_install_reads_as_downloads_without_percentages():
    said = steps_of(recorded("install_old_pip"))
    assert_readable(said)
    assert not any(text.endswith("%") for text, _ in said)
    assert said[1] == ("downloading funcnodes-images 0.2.6 (20 kB)", 0.1)
    assert said[-1][0].startswith("installing ") and said[-1][1] == 0.75


@pytest.mark.parametrize(
    "recording, sentence",
    [
        ("no_such_package", "no package funcnodes-no-such-package-tw found in the package index"),
        ("unsatisfiable", "no version of funcnodes-numpy matches ==99.0 (newest: 0.2.12)"),
        ("no_network", "the package index cannot be reached (no network?)"),
        ("old_pip_refuses_raw", "option --progress-bar: invalid choice: 'raw' (choose from 'on',"
                                " 'off')"),
    ],
)
def test_failures_read_as_one_sentence(recording, sentence):
    lines = recorded(recording)
    assert pipsteps.failure(lines) == sentence
    assert steps_of(lines) == [("resolving", 0.1)]


def test_other_errors_keep_pips_line_without_paths_or_addresses():
    line = ("ERROR: Could not install packages due to an OSError: [Errno 13] Permission denied:"
            " '/srv/venv/lib/python3.11/site-packages/numpy/__init__.py' (via"
            " https://user:secret@mirror.example/simple/numpy/)")
    text = pipsteps.failure(["Collecting numpy", line])
    assert text == ("Could not install packages due to an OSError: [Errno 13] Permission denied:"
                    " '__init__.py' (via …")
    assert pipsteps.failure(["Successfully installed x-1"]) is None


@pytest.mark.parametrize("recording", ["no_such_package", "unsatisfiable", "no_network"])
@pytest_twisted.ensureDeferred
async def test_a_failed_install_says_one_sentence_and_changes_nothing(
    tmp_path, monkeypatch, recording
):
    worker = new_worker(tmp_path)
    await run(worker, "add_package_dependency", name="funcnodes-basic")
    node = await run(worker, "add_node", id="input.int")
    deps = dict(worker.package_dependencies)
    worker.outlet.messages.clear()
    monkeypatch.setattr(reactor, "spawnProcess", FakeProcess(recorded(recording), code=1))
    with pytest.raises(packages.InstallError) as error:
        await run(worker, "add_package_dependency", name="funcnodes-plotly")
    sentence = pipsteps.failure(recorded(recording))
    assert str(error.value) == sentence
    assert worker.outlet.progress() == [
        ("Add package dependency funcnodes-plotly", "info", 0.0, True),
        ("Installing funcnodes-plotly: resolving", "info", 0.1, True),
        (f"Could not install funcnodes-plotly: {sentence}", "error", 0.0, True),
    ]
    assert [n.uuid for n in worker.nodespace.nodes] == [node.uuid]
    assert worker.package_dependencies == deps


@pytest_twisted.ensureDeferred
async def test_a_pip_without_raw_progress_runs_again_without_it(monkeypatch):
    class OldPip(FakeProcess):
        def __call__(self, protocol, executable, args=(), *rest, **kwargs):
            raw = "raw" in args
            self.lines, self.code = (recorded("old_pip_refuses_raw"), 2) if raw else ([], 0)
            return super().__call__(protocol, executable, args, *rest, **kwargs)

    fake = OldPip()
    monkeypatch.setattr(reactor, "spawnProcess", fake)
    installer = packages.Installer()
    for _ in range(2):
        await installer.upgrade({}, "funcnodes-basic")
    plain = [sys.executable, "-m", "pip", "install", "--upgrade", "funcnodes-basic"]
    assert fake.calls == [
        [*plain[:4], "--progress-bar", "raw", *plain[4:]],
        plain,
        plain,  # remembered
    ]


# endregion
# region the start


def write_config(tmp_path, uuid, config):
    workers = tmp_path / "workers"
    workers.mkdir(parents=True, exist_ok=True)
    (workers / f"worker_{uuid}.json").write_text(json.dumps(config))


class Started:
    def __init__(self, tmp_path, uuid):
        self.service = create(uuid, workers_dir=tmp_path / "workers", clock=reactor)
        self.worker = self.service.worker
        self.worker.outlet = Recorder()

    async def start(self, spawns):
        self.service.startService()
        self.port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(self.service.resource)
        )
        self.service.listening(self.port.getHost())
        # Listening and running before any pip was started.
        self.spawned_at_listening = len(spawns)
        self.runstate_at_listening = self.worker.files.runstate.read_text()

    async def stop(self):
        if self.service.running:
            await self.service.stopService()
        await self.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_missing_dependencies_install_after_the_port_listens(tmp_path, venv, wheels, spawns):
    # A graph with a tinyfn node, saved by a worker that had tinyfn.
    other = tmp_path / "other"
    other_venv = (other / "venv", make_venv(other / "venv"))
    sys.path.insert(0, str(other_venv[1]))
    try:
        first = new_worker(other, venv_config(other_venv, wheels), uuid="first")
        await run(first, "add_package_dependency", name="tinyfn")
        await run(first, "add_package_dependency", name="funcnodes-basic")
        node = await run(first, "add_node", id="tinyfn.double")
        source = await run(first, "add_node", id="input.int")
        await run(first, "add_edge", src_nid=source.uuid, src_ioid="integer",
                  trg_nid=node.uuid, trg_ioid="x")
        state = first.save_state()
    finally:
        sys.path.remove(str(other_venv[1]))
        _forget_tinyfn()
    assert tinyfn_version() is None
    spawns.clear()

    uuid = "startworker"
    config = venv_config(venv, wheels)
    config["package_dependencies"] = {
        "funcnodes-basic": {"package": "funcnodes-basic", "version": None},
        "tinyfn": {"package": "tinyfn", "version": None},
    }
    config["update_on_startup"] = dict(NO_CORE_UPDATES)
    write_config(tmp_path, uuid, config)
    data = tmp_path / "workers" / f"worker_{uuid}"
    data.mkdir(parents=True)
    (data / "nodespace.json").write_text(json.dumps(state))

    started = Started(tmp_path, uuid)
    try:
        await started.start(spawns)
        worker = started.worker
        assert started.spawned_at_listening == 0
        assert started.runstate_at_listening == "running"
        # Until pip is done the node waits as a placeholder, data intact.
        assert isinstance(worker.nodespace.get_node_by_id(node.uuid), PlaceHolderNode)
        assert worker.nodespace.serialize_edges() == [tuple(e) for e in state["backend"]["edges"]]
        recorded = worker.worker_json()["package_dependencies"]["tinyfn"]
        assert recorded == {"package": "tinyfn", "version": None}

        await started.service.startup_jobs
        assert len(spawns) == 1 and spawns[0][-1] == "tinyfn"
        revived = worker.nodespace.get_node_by_id(node.uuid)
        assert not isinstance(revived, PlaceHolderNode)
        assert revived.node_id == "tinyfn.double"
        assert revived.inputs["x"].connections[0].node.uuid == source.uuid
        assert worker.nodespace.get_secret_property("files_dir") == worker.files.files.as_posix()
        progress = worker.outlet.progress()
        assert progress == [
            ("Add package dependency tinyfn", "info", 0.0, False),
            ("Installing tinyfn: resolving", "info", 0.1, False),
            ("Installing tinyfn: installing tinyfn", "info", 0.75, False),
            ("Adding tinyfn to the library", "info", 0.9, False),
            ("Package dependency added tinyfn", "success", 1, False),
        ]
        assert worker.outlet.events("fullsync")
        assert worker.save_requested
    finally:
        await started.stop()


@pytest_twisted.ensureDeferred
async def test_update_on_startup_upgrades_a_venv_worker_after_listening(
    tmp_path, venv, wheels, spawns
):
    pip_into(venv[0], "--no-index", "--find-links", str(wheels["good"]), "tinyfn==0.1")
    spawns.clear()
    uuid = "updworker"
    config = venv_config(venv, wheels)
    config["update_on_startup"] = {**NO_CORE_UPDATES, "tinyfn": True, "not-installed-package": True}
    write_config(tmp_path, uuid, config)
    started = Started(tmp_path, uuid)
    try:
        await started.start(spawns)
        assert started.spawned_at_listening == 0
        await started.service.startup_jobs
        assert len(spawns) == 1, "only installed packages are upgraded"
        assert "--upgrade" in spawns[0] and spawns[0][-1] == "tinyfn"
        assert tinyfn_version() == "0.2"
        assert started.worker.outlet.progress() == [
            ("Upgrading tinyfn: resolving", "info", 0.1, False),
            ("Upgrading tinyfn: installing tinyfn", "info", 0.75, False),
            ("Upgraded tinyfn 0.1 -> 0.2; restart the worker to use it", "success", 1, False),
        ]
        log = (started.worker.files.data / "worker.log").read_text()
        assert "pip: Successfully installed tinyfn-0.2" in log
    finally:
        await started.stop()


@pytest_twisted.ensureDeferred
async def test_failed_update_on_startup_is_reported_and_the_worker_runs_on(
    tmp_path, venv, wheels, spawns
):
    pip_into(venv[0], "--no-index", "--find-links", str(wheels["good"]), "tinyfn==0.1")
    uuid = "failworker"
    config = venv_config(venv, wheels, folder="broken")
    config["update_on_startup"] = {**NO_CORE_UPDATES, "tinyfn": True}
    write_config(tmp_path, uuid, config)
    started = Started(tmp_path, uuid)
    try:
        await started.start(spawns)
        await started.service.startup_jobs
        assert tinyfn_version() == "0.1"
        message, status, value, blocking = started.worker.outlet.progress()[-1]
        assert message == (
            "Could not upgrade tinyfn: Wheel 'tinyfn' located at tinyfn-0.3-py3-none-any.whl"
            " is invalid."
        )
        assert (status, value, blocking) == ("error", 0.0, False)
        assert started.worker.files.runstate.read_text() == "running"
        assert await run(started.worker, "uuid") == uuid
        log = (started.worker.files.data / "worker.log").read_text()
        assert "Upgrading tinyfn failed, running on 0.1" in log
    finally:
        await started.stop()


def test_update_on_startup_needs_a_venv_or_an_opt_in():
    updates = {"funcnodes-core": True, "funcnodes-basic": True, "funcnodes": False}
    assert packages.startup_updates({"update_on_startup": updates}) == []
    assert packages.startup_updates({"update_on_startup": updates, "self_update": False,
                                     "env_path": "/somewhere"}) == []
    assert packages.startup_updates({"update_on_startup": updates, "self_update": True}) == [
        "funcnodes-core", "funcnodes-basic"
    ]
    evil = {"--index-url=http://evil": True, "funcnodes-core": True}
    config = {"update_on_startup": evil, "self_update": True}
    assert packages.startup_updates(config) == ["funcnodes-core"]


@pytest_twisted.ensureDeferred
async def test_update_on_startup_opt_in_uses_the_running_interpreter(tmp_path, monkeypatch):
    fake = FakeProcess(["Requirement already satisfied: funcnodes-core in /some/venv (2.4.0)"])
    monkeypatch.setattr(reactor, "spawnProcess", fake)
    current = importlib.metadata.version("funcnodes-core")

    worker = new_worker(tmp_path, {"update_on_startup": {"funcnodes-core": True}})
    await library.startup_jobs(worker, [])
    assert fake.calls == [] and worker.outlet.messages == []

    worker.config["self_update"] = True
    await library.startup_jobs(worker, [])
    assert fake.calls == [[sys.executable, "-m", "pip", "install", "--progress-bar", "raw",
                           "--upgrade", "funcnodes-core"]]
    assert worker.outlet.progress() == [
        ("Upgrading funcnodes-core: resolving", "info", 0.1, False),
        (f"funcnodes-core {current} is up to date", "success", 1, False),
    ]


# endregion
# region module list


MODULE_CSV = (
    "package_name,description,version,homepage,source,releases,last_updated,summary\n"
    'funcnodes-basic,Basic nodes,1.0.0,https://example.org/basic,https://example.org/src,'
    '"1.0.0, 1.1.0",2025-01-01,basic\n'
    'funcnodes-imaginary,Nodes that do not exist,0.3.0,https://example.org/imag,,"0.1.0,0.3.0",,\n'
    "-bad name,refused,,,,,,\n"
)


@pytest_twisted.ensureDeferred
async def test_available_modules_from_the_cache_without_network(tmp_path, hermetic, monkeypatch):
    import treq

    def no_network(*args, **kwargs):
        raise AssertionError("get_available_modules went to the network")

    monkeypatch.setattr(treq, "get", no_network)
    worker = new_worker(tmp_path)
    answer = await run(worker, "get_available_modules")
    # No cache yet: the shipped snapshot has the catalogue.
    snapshot = libraries.parse_module_list(libraries.SNAPSHOT.read_text())
    installed = {m["name"] for m in answer["installed"]}
    assert installed >= {"funcnodes-basic"}
    offered = {m["name"] for m in answer["available"]}
    assert "funcnodes-numpy" in offered | installed
    assert offered == {row["package_name"] for row in snapshot.values()} - installed

    hermetic.parent.mkdir(parents=True)
    hermetic.write_text(MODULE_CSV)
    await run(worker, "add_package_dependency", name="funcnodes-basic")
    answer = await run(worker, "get_available_modules")
    assert answer["available"] == [{
        "name": "funcnodes-imaginary",
        "description": "Nodes that do not exist",
        "version": "0.3.0",
        "homepage": "https://example.org/imag",
        "source": "",
        "releases": ["0.1.0", "0.3.0"],
    }]
    [basic] = answer["active"]
    installed = importlib.metadata.version("funcnodes-basic")
    assert basic["name"] == "funcnodes-basic" and basic["version"] == installed
    assert basic["homepage"] == "https://example.org/basic"
    assert basic["releases"][:2] == ["1.0.0", "1.1.0"] and installed in basic["releases"]
    assert packages.MODULE_LIST.running is None
    assert worker.outlet.events("repos_update") == []


class Hanging(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = []

    def render_GET(self, request):
        self.requests.append(request)
        return NOT_DONE_YET


async def serve(resource):
    root = Resource()
    root.putChild(b"list.csv", resource)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(root))
    return port, f"http://127.0.0.1:{port.getHost().port}/list.csv"


@pytest_twisted.ensureDeferred
async def test_module_list_refresh_is_opt_in_background_and_announced(tmp_path, hermetic):
    port, url = await serve(Data(MODULE_CSV.encode(), "text/csv"))
    try:
        worker = new_worker(tmp_path)
        worker.module_list_url = url
        answer = await run(worker, "get_available_modules")
        # Answered at once from the snapshot; the download runs behind.
        assert "funcnodes-imaginary" not in {m["name"] for m in answer["available"]}
        running = packages.MODULE_LIST.running
        assert running is not None
        await running
        assert hermetic.read_text() == MODULE_CSV
        meta = json.loads(hermetic.with_name("funcnodes_modules.csv.meta.json").read_text())
        assert meta["source_url"] == url and meta["last_updated"].endswith("Z")
        [event] = worker.outlet.events("repos_update")
        repos = event["data"]["data"]["repos"]
        assert repos["funcnodes-imaginary"]["installed"] is False
        assert repos["funcnodes-imaginary"]["releases"] == ["0.1.0", "0.3.0"]
        assert repos["funcnodes-basic"]["installed"] is True
        assert repos["funcnodes-basic"]["moduledata"].name == "funcnodes_basic"

        answer = await run(worker, "get_available_modules")
        assert [m["name"] for m in answer["available"]] == ["funcnodes-imaginary"]
        assert packages.MODULE_LIST.running is None, "a fresh list is not downloaded again"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_module_list_refresh_gives_up_in_time_and_blocks_nothing(
    tmp_path, hermetic, monkeypatch
):
    monkeypatch.setattr(packages, "MODULE_LIST_TIMEOUT", 0.3)
    monkeypatch.setattr(packages.fetch_text, "__defaults__", (0.3,))
    hanging = Hanging()
    port, url = await serve(hanging)
    try:
        worker = new_worker(tmp_path)
        worker.module_list_url = url
        started = time.monotonic()
        await run(worker, "get_available_modules")
        running = packages.MODULE_LIST.running
        assert await run(worker, "uuid") == "pkgworker"
        assert not running.called, "answered while the download hangs"
        await running
        assert time.monotonic() - started < 5
        assert not hermetic.exists()
        assert worker.outlet.events("repos_update") == []
        assert packages.MODULE_LIST.running is None
    finally:
        for request in hanging.requests:
            if not request.finished and not request._disconnected:
                request.finish()
        await port.stopListening()
        await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_an_unchanged_list_is_not_announced_again(tmp_path, hermetic):
    hermetic.parent.mkdir(parents=True)
    hermetic.write_text(MODULE_CSV)
    old = time.time() - packages.MODULE_LIST_MAX_AGE - 1
    os.utime(hermetic, (old, old))
    served = Data(MODULE_CSV.encode(), "text/csv")
    port, url = await serve(served)
    try:
        worker = new_worker(tmp_path)
        worker.module_list_url = url
        answer = await run(worker, "get_available_modules")
        assert [m["name"] for m in answer["available"]] == ["funcnodes-imaginary"]
        await packages.MODULE_LIST.running
        assert module_list_age(hermetic) < 60, "downloaded and stored again"
        assert worker.outlet.events("repos_update") == []

        os.utime(hermetic, (old, old))
        served.data = MODULE_CSV.replace('"0.1.0,0.3.0"', '"0.1.0,0.3.0,0.4.0"').encode()
        await run(worker, "get_available_modules")
        await packages.MODULE_LIST.running
        [event] = worker.outlet.events("repos_update")
        assert event["data"]["data"]["repos"]["funcnodes-imaginary"]["releases"][-1] == "0.4.0"
    finally:
        await port.stopListening()


def module_list_age(path):
    return time.time() - path.stat().st_mtime


def settings_from(tmp_path, monkeypatch, *args, config=None):
    from funcnodes_tw.tap import Options

    monkeypatch.setattr(persistence, "workers_dir", lambda: tmp_path / "workers")
    if config is not None:
        write_config(tmp_path, "s", config)
    parsed = Options()
    parsed.parseOptions(["--uuid", "s", "--data-path", str(tmp_path / "data"), *args])
    return parsed.settings


def test_module_list_refresh_settings(tmp_path, monkeypatch):
    from funcnodes_tw.settings import MODULE_LIST_URL

    default = settings_from(tmp_path, monkeypatch)
    assert (default.refresh_module_list, default.module_list_url) == (True, MODULE_LIST_URL)
    off = settings_from(tmp_path, monkeypatch, "--no-refresh-module-list",
                        config={"refresh_module_list": True})
    assert off.refresh_module_list is False
    assert settings_from(
        tmp_path, monkeypatch, config={"refresh_module_list": False}
    ).refresh_module_list is False
    mirror = settings_from(tmp_path, monkeypatch, config={"module_list_url": "http://m/l.csv"})
    assert mirror.module_list_url == "http://m/l.csv"
    given = settings_from(tmp_path, monkeypatch, "--module-list-url", "https://x/y.csv")
    assert given.module_list_url == "https://x/y.csv"

    on = create("on", workers_dir=tmp_path / "w", clock=Clock(), settings=default)
    assert on.worker.module_list_url == MODULE_LIST_URL
    quiet = create("off", workers_dir=tmp_path / "w", clock=Clock(), settings=off)
    assert quiet.worker.module_list_url is None
    for service in (on, quiet):
        service.log.stop()


@pytest.mark.parametrize(
    "args, config",
    [((), {"refresh_module_list": "no"}), ((), {"module_list_url": "file:///etc/passwd"}),
     (("--module-list-url", "ftp://x/y"), None)],
)
def test_bad_module_list_settings_are_refused(tmp_path, monkeypatch, args, config):
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match="refresh_module_list|module_list_url"):
        settings_from(tmp_path, monkeypatch, *args, config=config)


@pytest_twisted.ensureDeferred
async def test_a_starting_worker_downloads_no_module_list(tmp_path, spawns, monkeypatch):
    import treq

    calls = []
    monkeypatch.setattr(treq, "get", lambda *a, **kw: calls.append(a))
    uuid = "quietstart"
    write_config(tmp_path, uuid, {"update_on_startup": dict(NO_CORE_UPDATES)})
    started = Started(tmp_path, uuid)
    assert started.worker.module_list_url is not None, "refreshes are on"
    try:
        await started.start(spawns)
        await started.service.startup_jobs
        await deferLater(reactor, 0.1, lambda: None)
        assert calls == [] and packages.MODULE_LIST.running is None
    finally:
        await started.stop()


def test_module_list_parsing_keeps_the_reference_columns():
    rows = libraries.parse_module_list(MODULE_CSV)
    assert set(rows) == {"funcnodes-basic", "funcnodes-imaginary"}
    assert rows["funcnodes-basic"]["releases"] == ["1.0.0", "1.1.0"]
    assert rows["funcnodes-basic"]["summary"] == "basic"
    assert rows["funcnodes-imaginary"]["source"] is None


# endregion
# region local scripts


SCRIPT = '''
import funcnodes_core as fn
from pathlib import Path

Path(__file__).with_suffix(".ran").write_text("ran")


@fn.NodeDecorator("{node_id}", name="{name}")
def greet(who: str = "world") -> str:
    return "hello " + who


NODE_SHELF = fn.Shelf(name="local {tag}", nodes=[greet])
'''


def write_script(folder, name, node_id, tag, label="Greet"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(SCRIPT.format(node_id=node_id, name=label, tag=tag))
    return path


def test_local_scripts_are_not_run_unless_enabled(tmp_path):
    tag = uuid4().hex[:8]
    worker = new_worker(tmp_path)
    script = write_script(worker.files.local_scripts, "greet.py", f"local_{tag}.greet", tag)
    assert library.load_local_scripts(worker) is None
    assert not script.with_suffix(".ran").exists()
    assert not worker.nodespace.lib.has_node_id(f"local_{tag}.greet")
    with pytest.raises(ValueError, match="Local scripts are disabled"):
        library.reload_local_scripts(worker)


def test_local_scripts_load_at_start_when_enabled(tmp_path):
    tag = uuid4().hex[:8]
    uuid = "scriptworker"
    write_config(tmp_path, uuid, {"local_scripts": True, "package_dependencies": {}})
    files = WorkerFiles(uuid, root=tmp_path / "workers")
    write_script(files.local_scripts / "sub", "greet.py", f"local_{tag}.greet", tag)
    write_script(files.local_scripts, "broken.py", f"local_{tag}.broken", tag).write_text("1/0\n")
    clock = Clock()
    worker = Worker(files, uuid, clock=clock)
    service = WorkerService(worker, clock, Settings(max_message_size=1024 * 1024))
    try:
        service.prepare()
        assert worker.nodespace.lib.has_node_id(f"local_{tag}.greet")
        assert (files.local_scripts / "sub" / "greet.ran").exists()
    finally:
        service.log.stop()
        persistence.remove(files.process)


@pytest_twisted.ensureDeferred
async def test_reload_local_scripts_picks_up_edits_and_reports_failures(tmp_path):
    tag = uuid4().hex[:8]
    worker = new_worker(tmp_path, {"local_scripts": True})
    folder = worker.files.local_scripts
    write_script(folder, "greet.py", f"local_{tag}.greet", tag)
    assert library.load_local_scripts(worker) == {"loaded": ["greet.py"], "failed": {}}
    node = await run(worker, "add_node", id=f"local_{tag}.greet")

    write_script(folder, "greet.py", f"local_{tag}.greet", tag, label="Hello")
    write_script(folder, "more.py", f"local_{tag}.more", tag + "b")
    (folder / "broken.py").write_text("raise RuntimeError('script broke')\n")
    result = await run(worker, "reload_local_scripts")
    assert result["loaded"] == ["greet.py", "more.py"]
    assert result["failed"] == {"broken.py": "RuntimeError: script broke"}
    lib = worker.nodespace.lib
    assert lib.has_node_id(f"local_{tag}.more")
    assert lib.get_node_by_id(f"local_{tag}.greet").node_name == "Hello"
    # The graph keeps its node; the shelves are not doubled.
    assert [n.uuid for n in worker.nodespace.nodes] == [node.uuid]
    assert [s.name for s in lib.shelves].count(f"local {tag}") == 1
    assert worker.outlet.events("fullsync")


# endregion
