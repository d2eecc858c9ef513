"""
Node libraries: FuncNodes modules installed in this environment, the cached
list of modules that could be installed, and the worker's local scripts.

A module advertises itself through the C{funcnodes.module} entry point group;
funcnodes-core's setup collects them. Package names (C{funcnodes-basic}) map
to module names (C{funcnodes_basic}) by swapping dashes for underscores, or,
for packages named otherwise, through their distribution's entry points.
Nothing here touches the network.
"""

import csv
import hashlib
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

from twisted.logger import Logger

from funcnodes_core._setup import AVAILABLE_MODULES, setup, setup_module
from funcnodes_core.utils.plugins_types import InstalledModule

_log = Logger()

#: What a brand-new worker has in its library, so it has real nodes at once.
DEFAULT_PACKAGES = ("funcnodes-basic",)


class PackageNotFound(ValueError):
    pass


def installed_modules():
    """
    Every installed FuncNodes module, by module name; no network involved.
    """
    setup()
    return AVAILABLE_MODULES


def find_module(name):
    """
    The installed module for a package or module name.

    @raise PackageNotFound: when nothing of that name is installed.
    """
    modname = name.replace("-", "_")
    modules = installed_modules()
    module = modules.get(modname)
    if module is not None:
        return module
    for candidate in _distribution_modules(name):
        if candidate in modules:
            return modules[candidate]
    try:
        imported = importlib.import_module(modname)
    except ImportError:
        raise PackageNotFound(f"Package {name} not found") from None
    module = setup_module(InstalledModule(name=modname, module=imported))
    AVAILABLE_MODULES[modname] = module
    return module


def _distribution_modules(name):
    """
    The modules distribution C{name} advertises as C{funcnodes.module}.
    """
    try:
        points = importlib.metadata.distribution(name).entry_points
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return []
    points = [p for p in points if p.group == "funcnodes.module"]
    points.sort(key=lambda p: p.name != "module")
    return [p.module for p in points]


def package_name(module):
    return module.name.replace("_", "-")


def shelf_of(module):
    """
    The module's shelf, or None for modules without nodes.
    """
    return module.entry_points.get("shelf")


def register_ui_plugin(module):
    """
    Offer the module's UI plugin through C{get_plugin_keys}.

    funcnodes-core sets modules up in entry-point order, so a module set up
    before funcnodes_react_flow registered its hook never had its plugin
    recorded; the keys are C{str(module)}, as the hook makes them.
    """
    try:
        import funcnodes_react_flow
    except ImportError:
        return
    plugin = module.entry_points.get("react_plugin")
    imported = module.module or module.entry_points.get("module")
    if plugin is not None and imported is not None:
        funcnodes_react_flow.FUNCNODES_REACT_PLUGIN[str(imported)] = plugin


def describe(module):
    """
    The C{get_available_modules} entry for an installed module.
    """
    return {
        "name": package_name(module),
        "description": module.description or "No description available",
        "version": module.version or "latest",
        "homepage": "",
        "source": "",
        "releases": [module.version] if module.version else [],
    }
