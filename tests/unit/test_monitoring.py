"""deploy/components/monitoring: the alerts fire for faults induced in a lab and stay silent for a
healthy run; every alert and dashboard query parses and uses only what a live agent exports.

The series in data/monitoring were recorded from a live lab agent by
tests/integration/record_monitoring.py, one scrape every 5 s, and are replayed here one
sample per minute (promtool's ``interval: 1m``): time is stretched twelve-fold so that the
rules' ``for:`` clauses and windows are covered by a recording of a few minutes. Ratios are
unchanged by the stretch; per-second rates are twelve times lower, so no rule here uses an
absolute rate threshold. The conntrack alerts cannot be induced in the lab (filling the table
needs the machine-wide nf_conntrack_max lowered): their phase is the recorded healthy series
with the conntrack series replaced, which the test says where it does it.

``metrics.txt`` is a full scrape of that agent: the names and labels every query may use (plus
the labels the ServiceMonitor's scrape adds). What this cannot prove: that Grafana renders the
panels, or that the Prometheus Operator accepts the objects (no CRD schema here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
COMPONENT = ROOT / "deploy/components/monitoring"
DATA = Path(__file__).parent / "data" / "monitoring"
#: labels a ServiceMonitor scrape adds to every series (job, instance, the relabelled node, and the
#: operator's own pod labels)
TARGET_LABELS = {"job", "instance", "node", "namespace", "pod", "container", "endpoint"}
NODE = "lab-node"

#: phase -> the alerts that must fire at some point during it, and none other
EXPECTED = {
    "healthy": set(),
    "failed-open": {"DnsguardFailedOpen", "DnsguardSlowLookups"},
    # each restart leaves the self-probe's lookups to the cache unanswered for a moment
    "restarting": {"DnsguardCacheRestarting", "DnsguardSlowLookups"},
    # once unbound gives up on the server it answers SERVFAIL at once, so the phase's lookups
    # (each a new name: all misses) run at ~20/s and overflow the request list while it probes
    "upstream-down": {"DnsguardUpstreamDown", "DnsguardUpstreamFailureRate",
                      "DnsguardRequestListDrops", "DnsguardCacheHitRatioCollapsed"},
    # the storm (40000 new names in ~20 s, all misses) overflowed the request list once
    "nxdomain-storm": {"DnsguardCacheHitRatioCollapsed", "DnsguardRequestListDrops"},
    # the flushed rules included the interception: the node failed open until they are back
    "not-in-sync": {"DnsguardRulesNotInSync", "DnsguardFailedOpen"},
    "conntrack-full": {"DnsguardConntrackTableFull", "DnsguardConntrackDrops"},
}


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; scripts/setup)")
    return tool


def rule_groups() -> list[dict[str, Any]]:
    doc = yaml.safe_load((COMPONENT / "prometheusrule.yaml").read_text())
    groups: list[dict[str, Any]] = doc["spec"]["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def panels() -> Iterator[tuple[str, str, str]]:
    """(dashboard, panel title, expr with Grafana's variables filled in) for every target."""
    for path in sorted(COMPONENT.glob("*.json")):
        dash = json.loads(path.read_text())
        for p in dash["panels"]:
            for t in p["targets"]:
                yield path.name, p["title"], fill(t["expr"])
        for var in dash["templating"]["list"]:
            if var.get("type") == "query":
                m = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["definition"])
                assert m, var["definition"]
                yield path.name, f"variable {var['name']}", f"group by ({m[2]}) ({m[1]})"


def fill(expr: str) -> str:
    return expr.replace("$__rate_interval", "5m").replace("$node", NODE)


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Sample name -> its label names, from the live agent's scrape."""
    out: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families((DATA / "metrics.txt").read_text()):
        for s in fam.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def series(phase: str) -> list[dict[str, str]]:
    loaded: list[dict[str, str]] = yaml.safe_load((DATA / f"series-{phase}.yaml").read_text())
    return loaded


def conntrack_full() -> list[dict[str, str]]:
    """The healthy recording with its conntrack series replaced (see the module docstring):
    the table filling to 95 % of its max, insert_failed and early_drop rising."""
    healthy = series("healthy")
    n = len(healthy[0]["values"].split())
    ct_max = next(float(s["values"].split()[0]) for s in healthy
                  if s["series"].startswith("dnsguard_conntrack_max{"))
    out = []
    for s in healthy:
        name = s["series"]
        if name.startswith("dnsguard_conntrack_entries{"):
            vals = [int(ct_max * min(0.95, 0.5 + 0.1 * i)) for i in range(n)]
        elif re.match(r'dnsguard_conntrack_stat_total\{.*stat="(insert_failed|early_drop)"', name):
            vals = [10 * i for i in range(n)]
        else:
            out.append(s)
            continue
        out.append({"series": name, "values": " ".join(map(str, vals))})
    return out


# -- the component renders --------------------------------------------------------------------
def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (its built-in kustomize renders deploy/)")
    return kubectl


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    """An operator's site overlay: the iptables overlay plus the monitoring component."""
    d = tmp_path_factory.mktemp("site")
    (d / "kustomization.yaml").write_text(yaml.safe_dump({  # kustomize wants relative paths
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(ROOT / "deploy/overlays/iptables", d)],
        "components": [os.path.relpath(COMPONENT, d)]}))
    out = subprocess.run([_kubectl(), "kustomize", str(d)], capture_output=True, text=True,
                         check=True).stdout
    return {(doc["kind"], doc["metadata"]["name"]): doc
            for doc in yaml.safe_load_all(out) if doc}


def test_component_adds_monitor_rules_and_dashboards_to_an_overlay(site) -> None:
    assert {k for k in site if k[0] in ("ServiceMonitor", "PrometheusRule", "Service")} == {
        ("ServiceMonitor", "dnsguard"), ("Service", "dnsguard-metrics"),
        ("PrometheusRule", "dnsguard")}
    ds = site[("DaemonSet", "dnsguard")]
    pod = ds["spec"]["template"]
    monitor = site[("ServiceMonitor", "dnsguard")]
    service = site[("Service", "dnsguard-metrics")]
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == \
        ds["metadata"]["namespace"] == "kube-system"
    # the monitor selects the Service, the Service the agent's pods, on the port its probes use
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["clusterIP"] == "None"
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = service["spec"]["ports"]
    (container,) = pod["spec"]["containers"]
    assert endpoint["port"] == port["name"]
    assert port["targetPort"] == container["readinessProbe"]["httpGet"]["port"]
    # no containerPort: with hostNetwork it would be a hostPort and block the maxSurge pod
    assert "ports" not in container
    assert {"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"} in \
        endpoint["relabelings"]
    kubernetes_validate.validate(service, kubernetes_validate.latest_version(), strict=True)
    dashboards = site[("ConfigMap", "dnsguard-dashboards")]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(dashboards["data"]) == {"dnsguard-cluster.json", "dnsguard-node.json"}
    kubernetes_validate.validate(dashboards, kubernetes_validate.latest_version(), strict=True)
    # the overlay's own settings come through unchanged
    (settings,) = [doc for (kind, name), doc in site.items()
                   if kind == "ConfigMap" and name != "dnsguard-dashboards"]
    assert settings["data"]["DNSGUARD_MITIGATION"] == "nodelocal"


def test_every_alert_has_a_runbook_paragraph() -> None:
    readme = (ROOT / "deploy/README.md").read_text()
    for name, rule in alerts().items():
        anchor = name.lower()
        assert rule["annotations"]["runbook"] == f"deploy/README.md#{anchor}"
        assert f'<a id="{anchor}"></a>**{name}**' in readme, name
        assert rule["labels"]["severity"] in ("warning", "critical")


# -- promtool -----------------------------------------------------------------------------------
def test_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups()}))
    res = subprocess.run([_promtool(), "check", "rules", str(rules)], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in res.stdout


def test_promtool_check_catches_a_broken_expression(tmp_path: Path) -> None:
    """The check is not a no-op."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"alert": "Broken", "expr": "sum by (node (dnsguard_rules_in_sync)"}]}]}))
    res = subprocess.run([_promtool(), "check", "rules", str(rules)], capture_output=True,
                         text=True, check=False)
    assert res.returncode != 0


def run_promtool_tests(tmp_path: Path, tests: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule_groups()}))
    spec = tmp_path / "tests.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m",
                                    "tests": tests}))
    return subprocess.run([_promtool(), "test", "rules", str(spec)], capture_output=True,
                          text=True, check=False, cwd=tmp_path)


def fired_test(phase: str, input_series: list[dict[str, str]],
               expected: set[str]) -> dict[str, Any]:
    """Which alerts fired at any evaluation during the phase: exactly ``expected``."""
    n = len(input_series[0]["values"].split())
    return {"name": phase, "interval": "1m", "input_series": input_series,
            "promql_expr_test": [{
                "expr": 'group by (alertname) (max_over_time(ALERTS{alertstate="firing"}[1d]))',
                "eval_time": f"{n - 1}m",
                "exp_samples": [{"labels": f'{{alertname="{a}"}}', "value": 1}
                                for a in sorted(expected)]}]}


@pytest.mark.parametrize("phase", sorted(EXPECTED))
def test_alerts_fire_for_the_recorded_fault_and_only_for_it(tmp_path: Path, phase: str) -> None:
    data = conntrack_full() if phase == "conntrack-full" else series(phase)
    res = run_promtool_tests(tmp_path, [fired_test(phase, data, EXPECTED[phase])])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_the_alert_replay_can_fail(tmp_path: Path) -> None:
    """A healthy run claimed to fire DnsguardFailedOpen is refused: the replay has teeth."""
    res = run_promtool_tests(tmp_path, [fired_test("healthy", series("healthy"),
                                                   {"DnsguardFailedOpen"})])
    assert res.returncode != 0


def test_every_expected_alert_exists() -> None:
    assert set().union(*EXPECTED.values()) == set(alerts()), \
        "every alert is induced by some recorded phase"


def test_every_panel_query_parses(tmp_path: Path) -> None:
    rules = [{"record": f"panel:{i}", "expr": expr} for i, (_, _, expr) in enumerate(panels())]
    path = tmp_path / "panels.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    res = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


#: panels that are empty on a healthy node by design (they show only what went wrong)
EMPTY_WHEN_HEALTHY = {"Cache restarts (1h)"}


def test_every_panel_query_returns_data_on_the_recorded_healthy_node(tmp_path: Path) -> None:
    healthy = series("healthy")
    n = len(healthy[0]["values"].split())
    checks = [{"expr": f"(count({expr}) > bool 0) or vector(0)", "eval_time": f"{n - 1}m",
               "exp_samples": [{"labels": "{}", "value": 1}]}
              for _, title, expr in panels() if title not in EMPTY_WHEN_HEALTHY]
    res = run_promtool_tests(tmp_path, [{"name": "panels", "interval": "1m",
                                         "input_series": healthy, "promql_expr_test": checks}])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr


_NAME = re.compile(r"\bdnsguard_\w+")
_MATCHERS = re.compile(r"\b(dnsguard_\w+)\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_LABEL_KEY = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_LEGEND = re.compile(r"\{\{\s*\$?labels?\.?(\w+)\s*\}\}|\{\{(\w+)\}\}")


def queries() -> Iterator[tuple[str, str]]:
    for name, rule in alerts().items():
        yield f"alert {name}", rule["expr"]
    for dash, title, expr in panels():
        yield f"{dash}: {title}", expr


@pytest.mark.parametrize("where,expr", list(queries()))
def test_queries_use_only_exported_series_and_labels(exported, where: str, expr: str) -> None:
    names = set(_NAME.findall(expr))
    assert names, where
    unknown = names - set(exported)
    assert not unknown, f"{where}: not exported by the agent: {unknown}"
    for name, body in _MATCHERS.findall(expr):
        for key in _LABEL_KEY.findall(body):
            assert key in exported[name] | TARGET_LABELS, f"{where}: {name} has no label {key}"
    available = set().union(*(exported[n] for n in names)) | TARGET_LABELS
    for group in _GROUPING.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            assert label in available, f"{where}: no series here has a label {label}"


def test_legends_and_annotations_name_labels_that_survive_aggregation() -> None:
    """A legend {{x}} or annotation $labels.x must be a label the query's result keeps."""
    for path in sorted(COMPONENT.glob("*.json")):
        for p in json.loads(path.read_text())["panels"]:
            for t in p["targets"]:
                for a, b in _LEGEND.findall(t["legendFormat"]):
                    label = a or b
                    groups = _GROUPING.findall(t["expr"])
                    kept = {x.strip() for g in groups for x in g.split(",")}
                    assert not groups or label in kept, (path.name, p["title"], label)
    for name, rule in alerts().items():
        for label in re.findall(r"\$labels\.(\w+)", rule["annotations"]["summary"]):
            groups = _GROUPING.findall(rule["expr"])
            kept = {x.strip() for g in groups for x in g.split(",")}
            assert not groups or label in kept, (name, label)
