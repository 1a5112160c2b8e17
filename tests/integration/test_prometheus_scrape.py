"""A real Prometheus (Debian's) scrapes a live lab agent and evaluates the shipped rules.

Prometheus runs inside the lab node's network namespace, listening on that namespace's
127.0.0.1 only, with its storage in the test's tmp_path, for as long as the test. It scrapes
the agent every second; the test asks it, through its HTTP API, whether the target is up and
what the cache's hit ratio is, and whether the PrometheusRule's alerts evaluate without error
against the live series (a rule that references a label wrongly still evaluates: that is
tests/unit/test_monitoring.py's job).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dnsguard.model import ProxyMode
from dnsguard.testing.lab import Lab, LabConfig
from tests.support.lab_helpers import nodelocal_args, start_agent, stop_agent, wait_for

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="prometheus is not installed (scripts/setup)")]

ROOT = Path(__file__).resolve().parents[2]
PROM = "127.0.0.1:9090"
HIT_RATIO = ("sum(rate(dnsguard_cache_hits_total[30s])) "
             "/ sum(rate(dnsguard_cache_queries_total[30s]))")
QUERY = r"""
import sys, urllib.parse, urllib.request
url = "http://127.0.0.1:9090/api/v1/" + sys.argv[1]
if len(sys.argv) > 2:
    url += "?" + urllib.parse.urlencode({"query": sys.argv[2]})
with urllib.request.urlopen(url, timeout=5) as r:
    print(r.read().decode())
"""


def api(lab: Lab, path: str, query: str | None = None) -> Any:
    argv = [sys.executable, "-c", QUERY, path, *([query] if query else [])]
    out = lab.node_run(argv, check=False).stdout
    return json.loads(out)["data"] if out.strip() else None


def vector(lab: Lab, query: str) -> list[dict[str, Any]]:
    data = api(lab, "query", query)
    return list(data["result"]) if data else []


@pytest.fixture
def lab():
    with Lab(LabConfig(proxy_mode=ProxyMode.IPTABLES, iptables="legacy")) as lab:
        yield lab


def test_prometheus_scrapes_the_agent_and_computes_the_hit_ratio(lab: Lab,
                                                                 tmp_path: Path) -> None:
    agent = start_agent(lab, [*nodelocal_args(lab, tmp_path / "state"),
                              "--metrics-address", "127.0.0.1:9253", "--probe-interval", "1"],
                        tmp_path / "agent.log")
    rules = yaml.safe_load((ROOT / "deploy/components/monitoring/prometheusrule.yaml")
                           .read_text())["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "rules.yaml")],
        "scrape_configs": [{"job_name": "dnsguard",
                            "static_configs": [{"targets": ["127.0.0.1:9253"],
                                                "labels": {"node": "lab-node"}}]}]}))
    with (tmp_path / "prometheus.log").open("w") as plog:
        prom = lab.popen_in(lab.node_netns, [
            "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={PROM}",
            "--storage.tsdb.retention.time=1h"], stdout=plog, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: any(r["value"][1] == "1" for r in vector(lab, 'up{job="dnsguard"}')),
                 timeout=60, step=0.5)
        wait_for(lambda: any(r["value"][1] == "1"
                             for r in vector(lab, "dnsguard_cache_intercepting")), timeout=30)
        lab.lookup_load(count=200, duration=5)

        def ratio() -> float | None:
            res = vector(lab, HIT_RATIO)
            value = float(res[0]["value"][1]) if res else float("nan")
            return value if value == value else None  # NaN before two samples

        wait_for(lambda: (r := ratio()) is not None and r > 0.5, timeout=30, step=0.5)
        print(f"\nPrometheus: target up, hit ratio {ratio():.2f}")
        groups = api(lab, "rules")["groups"]
        evaluated = [r for g in groups for r in g["rules"]]
        assert len(evaluated) == len(rules["groups"][0]["rules"])
        wait_for(lambda: all(r.get("lastEvaluation", "").startswith("2")
                             for g in api(lab, "rules")["groups"] for r in g["rules"]),
                 timeout=20)
        bad = [(r["name"], r.get("lastError")) for g in api(lab, "rules")["groups"]
               for r in g["rules"] if r["health"] != "ok"]
        assert not bad
        # a healthy node: nothing fires
        assert not [a for a in api(lab, "alerts")["alerts"] if a["state"] == "firing"]
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        assert stop_agent(agent) == 0
