"""
Build the module list snapshot that ships in funcnodes_tw/data/.

Run before a release, from the project folder, with network:

    .venv/bin/python scripts/snapshot_modules.py

The public list (the reference's CSV) is taken as it is when it can be
reached. When it cannot, the same columns are built from PyPI's JSON API for
the FuncNodes packages named below: a package's entry points come from its
wheel when that is small, and packages whose wheel declares no
C{funcnodes.module} entry point (the core, the UI, tools) are left out.
A worker never runs this: at run time it reads the snapshot, or its cache.
"""

import argparse
import csv
import io
import json
import sys
import urllib.request
import zipfile
from configparser import ConfigParser
from pathlib import Path

from packaging.version import InvalidVersion, Version

from funcnodes_tw.settings import MODULE_LIST_URL

OUTPUT = Path(__file__).resolve().parent.parent / "funcnodes_tw" / "data" / "funcnodes_modules.csv"
COLUMNS = (
    "package_name", "version", "description", "entry_point__module", "entry_point__shelf",
    "last_updated", "homepage", "source", "summary", "entry_point__external_worker",
    "official", "releases",
)
#: FuncNodes packages on PyPI by Linkdlab (those without node modules drop out).
OFFICIAL = (
    "funcnodes-basic", "funcnodes-bt100-3j", "funcnodes-chemprop", "funcnodes-files",
    "funcnodes-hplc", "funcnodes-images", "funcnodes-keras", "funcnodes-lmfit",
    "funcnodes-microscopy", "funcnodes-module", "funcnodes-numpy", "funcnodes-opencv",
    "funcnodes-pandas", "funcnodes-plotly", "funcnodes-pydantic", "funcnodes-pyodide",
    "funcnodes-rdkit", "funcnodes-sec", "funcnodes-sklearn", "funcnodes-span",
    "funcnodes-storage", "funcnodes-umap", "funcnodes-weather", "funcnodes-webcam",
    "funcnodes-yolo",
)
PYPI_JSON = "https://pypi.org/pypi/{name}/json"
#: Wheels up to this size are downloaded to read their entry points.
WHEEL_LIMIT = 2 * 1024 * 1024
TIMEOUT = 10


def fetch(url):
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return response.read()


def from_public_list():
    text = fetch(MODULE_LIST_URL).decode("utf-8")
    header = next(csv.reader(io.StringIO(text)), [])
    if "package_name" not in header:
        raise ValueError("the public list has no package_name column")
    return text


def _versions(releases):
    good = []
    for version, files in releases.items():
        if not files or all(f.get("yanked") for f in files):
            continue
        try:
            good.append(Version(version))
        except InvalidVersion:
            continue
    return [str(v) for v in sorted(good)]


def _entry_points(files):
    """
    The wheel's entry points by group; None when the wheel is too large.
    """
    wheels = [f for f in files if f["filename"].endswith("-none-any.whl")]
    if not wheels or wheels[0]["size"] > WHEEL_LIMIT:
        return None
    with zipfile.ZipFile(io.BytesIO(fetch(wheels[0]["url"]))) as wheel:
        names = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
        if not names:
            return {}
        parser = ConfigParser(delimiters=("=",), interpolation=None)
        parser.optionxform = str
        parser.read_string(wheel.read(names[0]).decode("utf-8"))
    return {group: dict(parser[group]) for group in parser.sections()}


def row_from_pypi(name):
    """
    One CSV row for C{name}, or None when it is no FuncNodes module.
    """
    data = json.loads(fetch(PYPI_JSON.format(name=name)))
    info, files = data["info"], data["urls"]
    points = _entry_points(files)
    if points is None:
        module = name.replace("-", "_")
        points = {"funcnodes.module": {"module": module, "shelf": f"{module}:NODE_SHELF"}}
    declared = points.get("funcnodes.module")
    if not declared:
        return None
    urls = {key.lower(): value for key, value in (info.get("project_urls") or {}).items()}
    summary = (info.get("summary") or "").strip()
    return {
        "package_name": info["name"],
        "version": info["version"],
        "description": summary,
        "entry_point__module": declared.get("module", ""),
        "entry_point__shelf": declared.get("shelf", ""),
        "last_updated": max((f["upload_time_iso_8601"] for f in files), default=""),
        "homepage": info.get("home_page") or urls.get("homepage") or "",
        "source": urls.get("source") or urls.get("repository") or "",
        "summary": summary,
        "entry_point__external_worker": declared.get("external_worker", ""),
        "official": "True",
        "releases": ",".join(_versions(data["releases"])),
    }


def from_pypi(names, report):
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    writer.writeheader()
    for name in names:
        try:
            row = row_from_pypi(name)
        except Exception as exc:
            report(f"{name}: skipped ({exc})")
            continue
        if row is None:
            report(f"{name}: no funcnodes.module entry point, left out")
            continue
        report(f"{name}: {row['version']}")
        writer.writerow(row)
    return out.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--pypi-only", action="store_true", help="skip the public list")
    args = parser.parse_args(argv)

    def report(text):
        sys.stderr.write(text + "\n")

    text = None
    if not args.pypi_only:
        try:
            text = from_public_list()
            report(f"taken from {MODULE_LIST_URL}")
        except Exception as exc:
            report(f"{MODULE_LIST_URL} unreachable ({exc}); building from PyPI")
    if text is None:
        text = from_pypi(OFFICIAL, report)
    if text.count("\n") < 2:
        raise SystemExit("no packages found: the snapshot was not written")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    report(f"wrote {args.output}")


if __name__ == "__main__":
    main()
