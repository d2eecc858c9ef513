"""
Commands about the node library: shelves, packages, local scripts and UI
plugins, and the package work of a worker's start.

Packages are installed with pip by L{funcnodes_tw.packages}, off the reactor;
the module list comes from its cache or the shipped snapshot, and is
refreshed in the background when a client asks for it.
"""

import weakref

from funcnodes_core.node import PlaceHolderNode
from funcnodes_core.utils import saving
from twisted.internet import defer
from twisted.logger import Logger

from funcnodes_tw import external, libraries, packages, pipsteps
from funcnodes_tw.commands import command

_log = Logger()


@command
def get_library(worker):
    return worker.library_json()


def _module_name(src):
    if isinstance(src, dict):
        src = src.get("module") or src.get("package")
    if not isinstance(src, str) or not src:
        raise ValueError("src must be a module name or a shelf object with 'module'")
    return src


def _shelf(src):
    shelf = libraries.shelf_of(libraries.find_module(_module_name(src)))
    if shelf is None:
        raise ValueError(f"Shelf in {_module_name(src)} not found")
    return shelf


@command(saves=True)
def add_shelf(worker, src, save=True):
    worker.set_progress("Adding shelf", "info", 0.0, True)
    worker.nodespace.add_shelf(_shelf(src))
    worker.set_progress("Shelf added", "success", 1, False)
    return True


@command(saves=True)
def remove_shelf(worker, src, save=True):
    worker.nodespace.remove_shelf(_shelf(src))


@command(saves=True)
def add_package_dependency(
    worker, name, dep=None, save=True, version=None, sync=True, do_reload_base=True
):
    """
    Add a FuncNodes package's shelf to the library, installing it with pip
    first when it is missing (or does not match C{version}), and remember it
    in the worker config so that it is loaded again at every start.
    """
    if dep and "path" in dep:
        raise NotImplementedError("Local package dependencies not implemented")
    return defer.Deferred.fromCoroutine(add_dependency(worker, name, version, sync))


async def add_dependency(worker, name, version=None, sync=True, blocking=True):
    """
    C{add_package_dependency} with its progress messages; a Twisted coroutine.

    Nothing changes in the worker before pip has succeeded, so a failure
    leaves the library and the graph as they were.
    """
    worker.set_progress(f"Add package dependency {name}", "info", 0.0, blocking)
    try:
        spec = packages.specifier(version)
        packages.check_name(name)
        title = [f"Installing {name}"]
        steps = pip_steps(worker, lambda: title[0], blocking)

        def starting(upgrade):
            if upgrade:
                title[0] = f"Upgrading {name}"
            steps.resolving()

        await packages.installer_for(worker).ensure(
            worker.config, name, spec, starting, steps.line
        )
        add_package(worker, name, spec, blocking=blocking)
        worker.set_progress(f"Package dependency added {name}", "success", 1, False)
    except Exception as exc:
        worker.set_progress(f"Could not install {name}: {exc}", "error", 0.0, blocking)
        raise
    finally:
        if sync:
            worker.worker_event("fullsync")


def pip_steps(worker, title, blocking):
    """
    The steps of a pip run as progress messages (C{"<title>: <step>"}):
    what a person can follow, and nothing of the server (paths, indexes).
    """

    def report(text, value):
        worker.set_progress(f"{title()}: {text}", "info", value, blocking)

    return pipsteps.PipSteps(report)


def add_package(worker, name, spec=None, announce=True, blocking=True):
    """
    Put an installed package's shelf and UI plugin in place and record it.
    """
    module = libraries.find_module(name)
    if announce:
        worker.set_progress(f"Adding {name} to the library", "info", 0.9, blocking)
    shelf = libraries.shelf_of(module)
    if shelf is not None:
        worker.nodespace.add_shelf(shelf)
    external.register_module(worker, module)
    libraries.register_ui_plugin(module)
    record_dependency(worker, name, libraries.package_name(module), spec)


def record_dependency(worker, name, package, spec):
    version = None if spec is None else str(spec)
    worker.package_dependencies[name] = {"package": package, "version": version}


@command(saves=True)
def remove_package_dependency(worker, name, dep=None, save=True):
    """
    Remove a package's shelf (and the graph's nodes of its classes) and
    forget the dependency; nothing is uninstalled. A recorded dependency
    whose package is gone can always be forgotten.
    """
    if dep and "path" in dep:
        raise NotImplementedError("Local package dependencies not implemented")
    try:
        module = libraries.find_module(name)
    except libraries.PackageNotFound:
        if name not in worker.package_dependencies:
            raise
        module = None
    shelf = None if module is None else libraries.shelf_of(module)
    if shelf is not None:
        worker.nodespace.remove_shelf(shelf)
    worker.package_dependencies.pop(name, None)
    if module is not None:
        return external.unregister_module(worker, module)


@command
def get_available_modules(worker):
    """
    Installed modules plus the module list (cached, else shipped), at once
    and offline. The client asking is the moment to refresh the list: it
    is downloaded in the background (unless the settings say not to), and
    a list that differs from the one answered is sent with C{repos_update}.
    """
    listed = libraries.module_list(packages.module_list_path())
    active = set(worker.package_dependencies)
    active.update(dep["module"] for dep in worker.external.dependencies())
    answer = libraries.available_modules(listed, active)

    def announce(text):
        fresh = libraries.parse_module_list(text)
        if fresh != listed:
            worker.worker_event("repos_update", repos=libraries.repos(fresh))

    packages.MODULE_LIST.start(worker.module_list_url, announce)
    return answer


# region startup


def load_dependencies(worker, dependencies):
    """
    Load the configured packages that are installed, now; return the names
    and versions of those pip has to install first (after the port is up).

    Every dependency stays recorded, loaded or not, so that a save while it
    is missing does not drop it from the worker config.
    """
    missing = []
    for name, dep in (dependencies or {}).items():
        dep = dep if isinstance(dep, dict) else {}
        version = dep.get("version")
        record = {"package": dep.get("package") or name, "version": version}
        worker.package_dependencies[name] = record
        try:
            spec = packages.specifier(version)
            if packages.satisfied(name, spec):
                add_package(worker, name, spec, announce=False)
            else:
                missing.append((name, version))
        except Exception as exc:
            _log.error("Package {name} could not be loaded: {exc}", name=name, exc=exc)
    return missing


async def startup_jobs(worker, missing):
    """
    What starting a worker needs pip for, run once the port listens: the
    missing package dependencies, then C{update_on_startup}. Failures are
    reported (progress and log) and the worker runs on with what it has.
    """
    added = False
    for name, version in missing:
        try:
            await add_dependency(worker, name, version, sync=False, blocking=False)
            added = True
        except Exception as exc:
            _log.error("Package {name} could not be installed: {exc}", name=name, exc=exc)
    if added:
        revive_placeholders(worker)
        worker.request_save()
        worker.worker_event("fullsync")
    await update_on_startup(worker)


def keep_io_ids(state):
    """
    Name each saved IO by its key (a saved node's IOs lack C{id}), so that a
    node whose class is missing still has its IOs under their own ids as a
    placeholder and keeps its edges until its package is installed. Real
    nodes load the same either way.
    """
    backend = (state or {}).get("backend")
    nodes = backend.get("nodes") if isinstance(backend, dict) else None
    for node in nodes if isinstance(nodes, list) else ():
        ios = node.get("io") if isinstance(node, dict) else None
        for key, io in (ios if isinstance(ios, dict) else {}).items():
            if isinstance(io, dict):
                io.setdefault("id", key)
    return state


def revive_placeholders(worker):
    """
    Reload the graph when it holds placeholders for nodes whose classes the
    library now has: the graph was loaded while their package was missing.
    """
    lib = worker.nodespace.lib
    stale = [node for node in worker.nodespace.nodes if isinstance(node, PlaceHolderNode)]
    if not any(lib.has_node_id(node.node_id) for node in stale):
        return False
    _log.info("Reloading the graph with the newly installed nodes")
    # The graph only: external worker instances keep running as they are.
    nodespace = worker.nodespace
    nodespace.deserialize(saving.serialize_nodespace_for_saving(nodespace))
    nodespace.remove_property("files_dir")
    nodespace.set_secret_property("files_dir", worker.files.files.as_posix())
    return True


async def update_on_startup(worker):
    installer = packages.installer_for(worker)
    for name in packages.startup_updates(worker.config):
        before = packages.installed_version(name)
        steps = pip_steps(worker, lambda: f"Upgrading {name}", False)
        steps.resolving()
        try:
            after = await installer.upgrade(worker.config, name, steps.line)
        except Exception as exc:
            _log.error(
                "Upgrading {name} failed, running on {version}: {exc}",
                name=name, version=before, exc=exc,
            )
            worker.set_progress(f"Could not upgrade {name}: {exc}", "error", 0.0, False)
            continue
        if after == before:
            message = f"{name} {after} is up to date"
        else:
            message = f"Upgraded {name} {before} -> {after}; restart the worker to use it"
        _log.info("{message}", message=message)
        worker.set_progress(message, "success", 1, False)


# endregion
# region local scripts


def local_scripts_enabled(worker):
    return bool(worker.config.get("local_scripts"))


_SCRIPT_SHELVES = weakref.WeakKeyDictionary()


def load_local_scripts(worker):
    """
    Import the worker's C{local_scripts/**/*.py} (only when the worker
    config says C{"local_scripts": true}) and put their C{NODE_SHELF}s in
    the library, replacing what an earlier load put there.
    """
    if not local_scripts_enabled(worker):
        return None
    folder = worker.files.local_scripts
    folder.mkdir(parents=True, exist_ok=True)
    for shelf in _SCRIPT_SHELVES.pop(worker, []):
        worker.nodespace.remove_shelf(shelf, with_nodes=False)
    modules, failures = libraries.import_scripts(folder)
    shelves = []
    for relative, module in modules.items():
        shelf = getattr(module, "NODE_SHELF", None)
        if shelf is not None:
            try:
                worker.nodespace.add_shelf(shelf)
                shelves.append(shelf)
            except Exception as exc:
                _log.error("Shelf of local script {path} refused: {exc}", path=relative, exc=exc)
                failures[relative] = f"{type(exc).__name__}: {exc}"
        worker.external.register_local_classes(vars(module).values())
    _SCRIPT_SHELVES[worker] = shelves
    return {"loaded": sorted(modules), "failed": failures}


@command
def reload_local_scripts(worker):
    """
    Import the local scripts again (a funcnodes_tw command, not the
    reference's): edits and new files take effect without a restart.
    """
    if not local_scripts_enabled(worker):
        raise ValueError(
            'Local scripts are disabled: set "local_scripts": true in the worker config'
        )
    result = load_local_scripts(worker)
    worker.worker_event("fullsync")
    return result


# endregion


def _react_plugins(type):
    if type != "react":
        raise ValueError(f"Plugin type {type} not found")
    try:
        import funcnodes_react_flow
    except ImportError:
        return None
    return funcnodes_react_flow


@command
def get_plugin_keys(worker, type):
    module = _react_plugins(type)
    return [] if module is None else list(module.FUNCNODES_REACT_PLUGIN)


@command
def get_plugin(worker, key, type):
    module = _react_plugins(type)
    if module is None:
        raise ValueError(f"React plugin {key} not found")
    return module.get_react_plugin_content(key)
