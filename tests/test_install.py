"""
A real (non-editable) install puts the twistd plugin where Twisted finds it,
and after the documented cache step (docs/deployment.md) twistd runs without
writing into the installation.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_CACHE = "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True,
        capture_output=True,
    )
    return target


def _run(target, *args):
    # Run from the install: the checkout (an editable install's path entry) must
    # not shadow the installed plugin module.
    env = dict(os.environ, PYTHONPATH=str(target))
    return subprocess.run(
        args, env=env, cwd=target, capture_output=True, text=True, timeout=120
    )


def test_plugin_file_is_installed_without_package_markers(installed):
    plugins = installed / "twisted" / "plugins"
    assert (plugins / "funcnodes_worker_plugin.py").is_file()
    assert not (plugins / "__init__.py").exists()
    assert not (installed / "twisted" / "__init__.py").exists()


def test_twistd_lists_the_plugin_and_leaves_the_built_cache_alone(installed):
    cache = installed / "twisted" / "plugins" / "dropin.cache"
    built = _run(installed, sys.executable, "-c", BUILD_CACHE)
    assert built.returncode == 0, built.stderr
    assert cache.is_file(), f"the documented step builds the cache: {built.stderr}"
    before = (cache.stat().st_mtime_ns, cache.read_bytes())

    twistd = Path(sys.executable).parent / "twistd"
    result = _run(installed, str(twistd), "--help")
    assert result.returncode == 0, result.stderr
    assert "funcnodes-worker" in result.stdout
    help_result = _run(installed, str(twistd), "funcnodes-worker", "--help")
    assert "--listen" in help_result.stdout
    assert (cache.stat().st_mtime_ns, cache.read_bytes()) == before
