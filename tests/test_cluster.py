"""
Heavy nodes on a Dask cluster: the settings that point a worker at one.
"""

import json
import os
import subprocess
import sys

import pytest
from twisted.python import usage

from funcnodes_tw import persistence
from funcnodes_tw.tap import Options

PY = sys.executable


# region settings


def options(tmp_path, monkeypatch, *args, config=None):
    monkeypatch.setattr(persistence, "workers_dir", lambda: tmp_path / "workers")
    if config is not None:
        path = tmp_path / "workers" / "worker_c.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config))
    parsed = Options()
    parsed.parseOptions(["--uuid", "c", "--data-path", str(tmp_path / "data"), *args])
    return parsed.settings


def test_cluster_settings_from_the_command_line_and_the_config(tmp_path, monkeypatch):
    plain = options(tmp_path, monkeypatch)
    assert (plain.cluster, plain.cluster_nodes, plain.cluster_fallback) == (None, None, "error")
    config = {
        "cluster": "tcp://10.0.0.1:8786",
        "cluster_nodes": ["funcnodes_sklearn.*"],
        "cluster_fallback": "local",
    }
    from_config = options(tmp_path, monkeypatch, config=config)
    assert from_config.cluster == "tcp://10.0.0.1:8786"
    assert from_config.cluster_nodes == ["funcnodes_sklearn.*"]
    assert from_config.cluster_fallback == "local"
    both = options(tmp_path, monkeypatch, "--cluster", "tls://sched.example:9000", config=config)
    assert both.cluster == "tls://sched.example:9000"


@pytest.mark.parametrize(
    "args, config, message",
    [
        (["--cluster", "sched:8786"], None, "tcp://host:8786"),
        (["--cluster", "tcp://sched"], None, "tcp://host:8786"),
        ([], {"cluster": 8786}, "tcp://host:8786"),
        ([], {"cluster_nodes": "funcnodes_sklearn.*"}, "list of node id patterns"),
        ([], {"cluster_nodes": [""]}, "list of node id patterns"),
        ([], {"cluster_fallback": "thread"}, "error, local"),
    ],
)
def test_bad_cluster_settings_are_usage_errors(tmp_path, monkeypatch, args, config, message):
    with pytest.raises(usage.UsageError, match=message):
        options(tmp_path, monkeypatch, *args, config=config)


def test_a_cluster_without_distributed_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a)
    )
    with pytest.raises(usage.UsageError, match=r"pip install 'funcnodes-tw\[cluster\]'"):
        options(tmp_path, monkeypatch, "--cluster", "tcp://127.0.0.1:8786")
    # Without a cluster, distributed is not needed.
    assert options(tmp_path, monkeypatch).cluster is None


def test_without_a_cluster_dask_is_never_imported(tmp_path):
    script = (
        "import sys\n"
        "from funcnodes_tw.tap import Options, makeService\n"
        "o = Options()\n"
        f"o.parseOptions(['--uuid', 'nd', '--data-path', {str(tmp_path / 'd')!r}])\n"
        "makeService(o)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')))\n"
    )
    env = dict(os.environ, FUNCNODES_CONFIG_DIR=str(tmp_path / "config"))
    out = subprocess.run([PY, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# endregion
