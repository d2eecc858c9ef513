"""
docs/operations.md, the alert rules and the Grafana dashboard stay true: a
worker scraped over a real socket after real traffic exports exactly the
metrics the page lists, and the rules and panels use only names it exports.
"""

import configparser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
import yaml
from prometheus_client.parser import text_string_to_metric_families

from inprocess import start, texts  # noqa: F401 (fixture)

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGE = DOCS / "operations.md"
RULES = DOCS / "prometheus" / "funcnodes-alerts.yml"
DASHBOARD = DOCS / "grafana" / "funcnodes-worker.json"
UNIT = DOCS / "systemd" / "funcnodes-worker@.service"
#: A metric name in a PromQL expression or a table cell of the page.
NAME = re.compile(r"\b(?:funcnodes|process)_[a-z_]+\b")
#: What Prometheus adds to every target itself.
SYNTHETIC = {"up"}


@pytest_twisted.inlineCallbacks
def scrape_after_traffic(start, monkeypatch):
    """
    The metric families of a worker that answered commands, sent a large
    message, triggered a node, saved and cut off a client.
    """
    texts(monkeypatch)
    worker = yield start("--max-incoming-size", "2000", name="ops")
    client = yield worker.connect()
    client.send_json({"type": "cmd", "cmd": "test_text", "kwargs": {"size": 1_200_000}, "id": 1})
    yield client.wait_for(lambda message: message.get("type") == "large_message")
    nid = (yield client.call("add_node", id="add_node"))["id"]
    yield client.call("set_io_value", nid=nid, ioid="a", value=2)
    yield client.call("save")
    rude = yield worker.connect()
    rude.send_text("x" * 5000)  # over --max-incoming-size: closed with 1009
    yield rude.when_closed()
    response = yield worker.http.get(worker.url("/metrics"))
    assert response.code == 200
    return list(text_string_to_metric_families((yield response.text())))


def exported(families):
    """
    The names a query uses: a counter's C{_total}, a histogram's family name
    (the page) and every sample name (C{_bucket}, C{_count}, ...).
    """
    listed = {f.name + "_total" if f.type == "counter" else f.name for f in families}
    samples = {s.name for f in families for s in f.samples}
    return listed, samples


def page_table_names():
    """
    The metric names in the first column of the page's tables.
    """
    names = set()
    for line in PAGE.read_text().splitlines():
        first = line.split("|")[1] if line.startswith("|") else ""
        names.update(NAME.findall(first))
    return names


def rule_expressions():
    document = yaml.safe_load(RULES.read_text())
    return {
        rule["alert"]: rule["expr"] for group in document["groups"] for rule in group["rules"]
    }


def dashboard_expressions(variables=True):
    """
    The panels' PromQL, and (C{variables}) the variables' Grafana queries.
    """
    document = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in document["panels"] for target in panel.get("targets", [])]
    if variables:
        exprs += [
            v["query"]["query"] for v in document["templating"]["list"] if v["type"] == "query"
        ]
    return exprs


@pytest_twisted.inlineCallbacks
def test_the_page_lists_exactly_what_a_worker_exports(start, monkeypatch):
    scraped = yield scrape_after_traffic(start, monkeypatch)
    listed, _ = exported(scraped)
    assert all(family.samples for family in scraped), [f.name for f in scraped if not f.samples]
    assert len(listed) >= 20
    text = PAGE.read_text()
    assert not [name for name in listed if f"`{name}`" not in text]
    assert page_table_names() == listed


@pytest_twisted.inlineCallbacks
def test_alert_rules_and_dashboard_use_exported_metrics(start, monkeypatch):
    scraped = yield scrape_after_traffic(start, monkeypatch)
    _, samples = exported(scraped)
    rules = rule_expressions()
    dashboard = dashboard_expressions()
    assert {"FuncnodesWorkerDown", "FuncnodesReactorStalled", "FuncnodesSaveFailing",
            "FuncnodesClientsCutOff", "FuncnodesReactorLagging"} <= set(rules)
    for where, expr in [*rules.items(), *(("dashboard", e) for e in dashboard)]:
        used = set(NAME.findall(expr))
        assert used <= samples, f"{where}: {sorted(used - samples)} not exported"
        assert used or re.search(r"\bup\b", expr), f"{where}: no metric in {expr!r}"
    # The dashboard shows every family the worker exports.
    shown = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for expr in dashboard for name in NAME.findall(expr)
    }
    assert {f.name for f in scraped} - shown == set()


def test_the_scrape_config_on_the_page_matches_the_rules():
    (block,) = re.findall(r"```yaml\n(.*?)```", PAGE.read_text(), re.S)
    (job,) = yaml.safe_load(block)["scrape_configs"]
    assert job["authorization"]["type"] == "Bearer"
    for name, expr in rule_expressions().items():
        assert f'job="{job["job_name"]}"' in expr, name


def test_the_unit_asks_for_watchdog_pings_from_the_main_process():
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str
    unit.read(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    seconds = re.fullmatch(r"(\d+)s", service["WatchdogSec"])
    assert seconds and int(seconds.group(1)) >= 10  # far above the 1 s stall threshold


@pytest.mark.parametrize("which", ["rules", "dashboard"])
def test_promtool_accepts_the_expressions(tmp_path, which):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    if which == "rules":
        path = RULES
    else:
        # Grafana's variables as Prometheus would see them substituted.
        exprs = [
            e.replace("$__rate_interval", "1m").replace("$job", "j").replace("$instance", ".*")
            for e in dashboard_expressions(variables=False)
        ]
        path = tmp_path / "dashboard-rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
            {"record": f"dashboard:panel{i}", "expr": e} for i, e in enumerate(exprs)
        ]}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
