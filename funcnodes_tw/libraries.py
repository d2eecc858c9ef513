"""
Node libraries: FuncNodes modules installed in this environment, the cached
list of modules that could be installed, and the worker's local scripts.

A module advertises itself through the C{funcnodes.module} entry point group;
funcnodes-core's setup collects them (again only when the environment
changed). Package names (C{funcnodes-basic}) map to module names
(C{funcnodes_basic}) by swapping dashes for underscores, or, for packages
named otherwise, through their distribution's entry points.
A snapshot of the module list ships in C{data/}.
Nothing here touches the network.
"""

import csv
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path

from twisted.logger import Logger

from funcnodes_core._setup import AVAILABLE_MODULES, setup, setup_module
from funcnodes_core.node import REGISTERED_NODES
from funcnodes_core.utils.plugins import PLUGIN_FUNCTIONS
from funcnodes_core.utils.plugins_types import InstalledModule

_log = Logger()

#: What a brand-new worker has in its library, so it has real nodes at once.
DEFAULT_PACKAGES = ("funcnodes-basic",)


class PackageNotFound(ValueError):
    pass


#: What the environment looked like at funcnodes-core's last module scan.
_SCANNED = {"key": None}


def _environment_key():
    """
    C{sys.path} with each folder's modification time: installing or removing
    a distribution adds or removes a folder there, so the key changes (the
    same signal C{importlib.metadata} caches its folder listings by).
    """
    key = []
    for entry in sys.path:
        try:
            key.append((entry, os.stat(entry or ".").st_mtime_ns))
        except OSError:
            key.append((entry, None))
    return tuple(key)


def installed_modules():
    """
    Every installed FuncNodes module, by module name; no network involved.

    funcnodes-core's setup reads every distribution's entry points and runs
    a full C{gc.collect} for each module it has not imported, on every call:
    a tenth of a second or more with the reactor blocked. So it runs only
    when the environment changed since the last scan, or after L{rescan}.
    """
    key = _environment_key()
    if _SCANNED["key"] != key:
        _import_ui_package()
        setup()
        _SCANNED["key"] = key
    return AVAILABLE_MODULES


#: The UI package's development server: it imports the reference worker and
#: aiohttp (~17 MB, 0.3 s) for a server this worker never starts.
_UI_SERVER = "funcnodes_react_flow.run"


def _import_ui_package():
    """
    Import funcnodes_react_flow, whose entry point funcnodes-core's setup
    loads, without its C{run} module: the package tolerates that module
    failing to import, and a C{None} in C{sys.modules} makes it fail. It is
    importable again afterwards, for whoever wants it.
    """
    if "funcnodes_react_flow" in sys.modules or _UI_SERVER in sys.modules:
        return
    sys.modules[_UI_SERVER] = None
    try:
        import funcnodes_react_flow
    except ImportError:
        return  # not installed, or a version that needs its server: setup imports it whole
    finally:
        if sys.modules.get(_UI_SERVER, False) is None:
            del sys.modules[_UI_SERVER]
    _without_setup_hook(funcnodes_react_flow.plugin_setup)


def _without_setup_hook(plugin_setup):
    """
    funcnodes_react_flow's setup hook records the UI plugin of every
    installed module, and so imports each one, used or not (funcnodes-files
    brings aiohttp and requests: ~15 MB). L{register_ui_plugin} records the
    modules the worker adds, so the hook goes; and funcnodes-core, which
    reloads an imported entry-point module and runs its setup again, finds
    this one scanned already.
    """
    PLUGIN_FUNCTIONS.pop(plugin_setup.__name__, None)
    AVAILABLE_MODULES.setdefault(
        plugin_setup.__name__, InstalledModule(name=plugin_setup.__name__, module=None)
    )


def rescan():
    """
    Scan the installed modules now, whatever the environment key says: a
    folder's modification time can be coarse (a second on some file
    systems), so a scan just before pip ran may share its key.
    """
    _SCANNED["key"] = None
    return installed_modules()


def find_module(name):
    """
    The installed module for a package or module name.

    @raise PackageNotFound: when nothing of that name is installed.
    """
    modname = name.replace("-", "_")
    modules = installed_modules()
    module = modules.get(modname)
    if module is not None:
        return loaded(module)
    for candidate in _distribution_modules(name):
        if candidate in modules:
            return loaded(modules[candidate])
    try:
        imported = importlib.import_module(modname)
    except ImportError:
        raise PackageNotFound(f"Package {name} not found") from None
    module = setup_module(InstalledModule(name=modname, module=imported))
    AVAILABLE_MODULES[modname] = module
    return module


def _entry_point_types():
    """
    The standard library's C{EntryPoint}, and the importlib_metadata
    backport's once something imported it (dask does): the backport's finder
    answers the standard library's scan too, with its own class.
    """
    backport = sys.modules.get("importlib_metadata")
    backport_type = getattr(backport, "EntryPoint", None)
    if isinstance(backport_type, type):
        return (importlib.metadata.EntryPoint, backport_type)
    return (importlib.metadata.EntryPoint,)


def loaded(module):
    """
    C{module} with its entry points loaded and its setup run.

    funcnodes-core (2.4) leaves the entry points of a module it has not
    imported as C{EntryPoint}s and loads one when it is read, but it knows
    only the standard library's class: the backport's would be handed out
    unloaded (a shelf that is no Shelf, no worker classes).
    """
    points = module.entry_points
    types = _entry_point_types()
    for name, value in list(dict.items(points)):
        if not isinstance(value, types):
            continue
        try:
            dict.__setitem__(points, name, value.load())
        except Exception:
            _log.failure(
                "{module}: its entry point {name} failed to load", module=module.name, name=name
            )
            dict.__delitem__(points, name)
    imported = dict.get(points, "module")
    if module.module is None and imported is not None:
        module.set_module(imported)
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
    if plugin is None:
        plugin = getattr(imported, "REACT_PLUGIN", None)
    if plugin is not None and imported is not None:
        funcnodes_react_flow.FUNCNODES_REACT_PLUGIN[str(imported)] = plugin


NO_DESCRIPTION = "No description available"


def describe(module, listed=None):
    """
    The C{get_available_modules} entry for an installed module, completed
    by its row of the module list, if any.
    """
    listed = listed or {}
    version = module.version or listed.get("version") or "latest"
    releases = list(listed.get("releases") or [])
    if module.version and module.version not in releases:
        releases.append(module.version)
    return {
        "name": package_name(module),
        "description": module.description or listed.get("description") or NO_DESCRIPTION,
        "version": version,
        "homepage": listed.get("homepage") or "",
        "source": listed.get("source") or "",
        "releases": releases,
    }


def describe_listed(listed):
    """
    The C{get_available_modules} entry for a listed, not installed package.
    """
    return {
        "name": listed["package_name"],
        "description": listed.get("description") or listed.get("summary") or NO_DESCRIPTION,
        "version": listed.get("version") or "latest",
        "homepage": listed.get("homepage") or "",
        "source": listed.get("source") or "",
        "releases": list(listed.get("releases") or []),
    }


# region module list

#: The columns of the reference's C{funcnodes_modules.csv} we pass on.
LISTED_FIELDS = (
    "package_name",
    "version",
    "description",
    "entry_point__module",
    "entry_point__shelf",
    "entry_point__external_worker",
    "last_updated",
    "homepage",
    "source",
    "summary",
)


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_module_list(text):
    """
    The rows of a module list CSV by canonical package name.

    Releases are one comma-separated cell; rows without a package name or
    with one pip would refuse are skipped.
    """
    rows = {}
    for row in csv.DictReader(text.splitlines()):
        name = (row.get("package_name") or "").strip()
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?", name):
            continue
        entry = {key: (row.get(key) or "").strip() or None for key in LISTED_FIELDS}
        entry["package_name"] = name
        entry["releases"] = [v.strip() for v in (row.get("releases") or "").split(",") if v.strip()]
        rows[canonical(name)] = entry
    return rows


#: The module list as it was when this funcnodes_tw was built
#: (C{scripts/snapshot_modules.py}): a fresh worker offers it offline.
SNAPSHOT = Path(__file__).parent / "data" / "funcnodes_modules.csv"

_LISTED = {"key": None, "rows": {}}


def read_module_list(path):
    """
    The cached module list (parsed again only when the file changed); empty
    when there is none or it is unreadable.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return {}
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if _LISTED["key"] != key:
        try:
            rows = parse_module_list(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            _log.warn("Ignoring unreadable module list {path}: {exc}", path=path, exc=exc)
            rows = {}
        _LISTED.update(key=key, rows=rows)
    return _LISTED["rows"]


def module_list(cache):
    """
    The newest module list there is: the downloaded C{cache}, else the
    shipped snapshot.
    """
    return read_module_list(cache) or read_module_list(SNAPSHOT)


def available_modules(listed, active_names):
    """
    C{get_available_modules}' answer: installed modules and listed packages,
    split into active (C{active_names}, any spelling), installed and available.
    """
    active_names = {canonical(n) for n in active_names}
    answer = {"installed": [], "active": [], "available": []}
    seen = set()
    for module in installed_modules().values():
        key = canonical(package_name(module))
        if key in seen:
            continue
        seen.add(key)
        entry = describe(module, listed.get(key))
        answer["active" if key in active_names else "installed"].append(entry)
    for key, row in listed.items():
        if key in seen:
            continue
        entry = describe_listed(row)
        answer["active" if key in active_names else "available"].append(entry)
    return answer


def repos(listed):
    """
    The C{repos_update} payload: every known package in the reference's
    C{AvailableRepo} JSON shape.
    """
    result = {}
    modules = {canonical(package_name(m)): m for m in installed_modules().values()}
    for key in list(modules) + [k for k in listed if k not in modules]:
        row = listed.get(key) or {}
        module = modules.get(key)
        entry = {field: row.get(field) for field in LISTED_FIELDS}
        name = row.get("package_name") or package_name(module)
        entry.update(
            package_name=name,
            installed=module is not None,
            version=(module.version if module is not None else None) or row.get("version") or "",
            description=row.get("description") or "",
            moduledata=module,
            releases=list(row.get("releases") or []),
        )
        result[name] = entry
    return result


# endregion
# region local scripts

def script_module_name(folder, path):
    """
    A stable, unique module name for a script: the same file gets the same
    name on every reload (funcnodes-core then accepts its node classes
    again), two folders never share names.
    """
    tag = hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:10]
    parts = Path(path).relative_to(folder).with_suffix("").parts
    dotted = ".".join(re.sub(r"\W", "_", part) or "_" for part in parts)
    return f"_funcnodes_local_{tag}.{dotted}"


def script_files(folder):
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        path
        for path in folder.rglob("*.py")
        if not any(part.startswith((".", "__pycache__")) for part in path.relative_to(folder).parts)
    )


def import_script(folder, path):
    """
    Import (again) one script as a fresh module; its exceptions propagate.
    """
    name = script_module_name(folder, path)
    # The node classes of its previous import give way to the new ones,
    # whatever the edit changed (funcnodes-core refuses a node id taken by
    # another class).
    for node_id, cls in list(REGISTERED_NODES.items()):
        if getattr(cls, "__module__", None) == name:
            REGISTERED_NODES.pop(node_id, None)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"Cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_scripts(folder):
    """
    Import every C{*.py} under C{folder}, which goes first on C{sys.path}
    so that scripts can import their neighbours.

    @return: C{(modules, failures)}: modules by relative path, and error
        texts by relative path.
    """
    folder = Path(folder)
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    modules, failures = {}, {}
    for path in script_files(folder):
        relative = path.relative_to(folder).as_posix()
        try:
            modules[relative] = import_script(folder, path)
        except Exception as exc:
            _log.failure("Local script {path} failed", path=relative)
            failures[relative] = f"{type(exc).__name__}: {exc}"
    return modules, failures


# endregion
