"""
Commands about the node library: shelves, packages and UI plugins.

Only what is installed in this environment is offered; nothing here touches
the network (installing packages is the job of a later, separate module).
"""

from funcnodes_tw import libraries
from funcnodes_tw.commands import command


@command
def get_library(worker):
    return worker.nodespace.lib.full_serialize()


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
    Add an installed FuncNodes package's shelf to the library, remembering it
    in the worker config so that it is loaded again at every start.
    """
    if dep and "path" in dep:
        raise NotImplementedError("Local package dependencies not implemented")
    worker.set_progress(f"Add package dependency {name}", "info", 0.0, True)
    try:
        add_package(worker, name, version)
        worker.set_progress(f"Package dependency added {name}", "success", 1, False)
    except Exception as exc:
        worker.set_progress(f"Could not install {name}({version}): {exc}", "error", 0.0, True)
        raise
    finally:
        if sync:
            worker.worker_event("fullsync")


def add_package(worker, name, version=None):
    module = libraries.find_module(name)
    worker.set_progress(f"Adding dependency {name}", "info", 0.8, True)
    shelf = libraries.shelf_of(module)
    if shelf is not None:
        worker.nodespace.add_shelf(shelf)
    libraries.register_ui_plugin(module)
    package = libraries.package_name(module)
    worker.package_dependencies[name] = {"package": package, "version": version or None}


@command(saves=True)
def remove_package_dependency(worker, name, dep=None, save=True):
    module = libraries.find_module(name)
    shelf = libraries.shelf_of(module)
    if shelf is not None:
        worker.nodespace.remove_shelf(shelf)
    worker.package_dependencies.pop(name, None)


@command
def get_available_modules(worker):
    active, installed = [], []
    for module in libraries.installed_modules().values():
        entry = libraries.describe(module)
        (active if entry["name"] in worker.package_dependencies else installed).append(entry)
    return {"installed": installed, "active": active, "available": []}


@command
def get_worker_dependencies(worker):
    return []


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
