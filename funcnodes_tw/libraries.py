"""
Node libraries: FuncNodes modules installed in this environment.

A module advertises itself through the C{funcnodes.module} entry point group;
funcnodes-core's setup collects them. Package names (C{funcnodes-basic}) map
to module names (C{funcnodes_basic}) by swapping dashes for underscores.
"""

import importlib

from funcnodes_core._setup import AVAILABLE_MODULES, setup, setup_module
from funcnodes_core.utils.plugins_types import InstalledModule

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
    module = installed_modules().get(modname)
    if module is not None:
        return module
    try:
        imported = importlib.import_module(modname)
    except ImportError:
        raise PackageNotFound(f"Package {name} not found") from None
    module = setup_module(InstalledModule(name=modname, module=imported))
    AVAILABLE_MODULES[modname] = module
    return module


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
