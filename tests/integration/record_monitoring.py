"""Record what a live lab agent exports, healthy and under induced faults, for the alert tests.

    sudo .venv/bin/python tests/integration/record_monitoring.py tests/unit/data/monitoring

One lab node, one agent (node-local mode, self-probe every second), scraped every
`SCRAPE_EVERY` seconds through each phase below; each phase is written as promtool
``input_series`` (tests/unit/test_monitoring.py replays them), and one full scrape is kept as
``metrics.txt`` (the dashboard and the rules may only use what it holds). A settle gap between
phases is not recorded, so each phase starts from the state the previous one left.

Phases: ``healthy`` (lookup load from both pods), ``failed-open`` (unbound frozen with SIGSTOP:
health checks fail, interception is withdrawn, the local self-probe times out),
``restarting`` (unbound killed three times), ``upstream-down`` (the "." forwarder frozen while a
pod asks for names outside the cluster), ``nxdomain-storm`` (one pod asks for thousands of
unique names: every one a miss), ``not-in-sync`` (the agent's xtables lock held while its rules
are flushed, so it cannot restore them).

Not a test: it takes about eight minutes and writes fixtures. Conntrack faults are not induced
here: filling the table needs the machine-wide nf_conntrack_max lowered, which this machine's
rules forbid; test_monitoring.py says how it builds those series instead.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dnsguard.model import ProxyMode
from dnsguard.testing.lab import Lab, LabConfig
from tests.support.lab_helpers import nodelocal_args, wait_for

SCRAPE_EVERY = 5.0
#: the labels a ServiceMonitor scrape adds (see deploy/components/monitoring/servicemonitor.yaml)
TARGET = {"job": "kube-system/dnsguard", "instance": "198.18.0.1:9253", "node": "lab-node"}
FETCH = r"""
import sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:9253" + sys.argv[1], timeout=5) as r:
    print(r.read().decode())
"""

Sample = dict[str, float]


def series_name(name: str, labels: dict[str, str]) -> str:
    lab = {**labels, **TARGET}
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(lab.items()))
    return f"{name}{{{inner}}}"


class Recorder:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def body(self) -> str:
        return self.lab.node_run([sys.executable, "-c", FETCH, "/metrics"], check=False).stdout

    def scrape(self) -> Sample:
        out: Sample = {}
        for fam in text_string_to_metric_families(self.body()):
            for s in fam.samples:
                if s.name.startswith("dnsguard_") and not s.name.endswith("_created"):
                    out[series_name(s.name, dict(s.labels))] = s.value
        return out

    def value(self, series: str) -> float:
        return self.scrape().get(series_name(series, {}), float("nan"))

    def phase(self, samples: int, action: Callable[[], None] | None = None) -> list[Sample]:
        """Scrape ``samples`` times, SCRAPE_EVERY apart, while ``action`` runs alongside."""
        t = threading.Thread(target=action, daemon=True) if action else None
        if t:
            t.start()
        out = []
        start = time.monotonic()
        for i in range(samples):
            time.sleep(max(0.0, start + i * SCRAPE_EVERY - time.monotonic()))
            out.append(self.scrape())
        if t:
            t.join(timeout=120)
        return out


def write_series(path: Path, samples: list[Sample]) -> None:
    keys = sorted({k for s in samples for k in s})
    lines = []
    for k in keys:
        vals = [(_fmt(s[k]) if k in s else "_") for s in samples]
        lines.append(f"- series: '{k}'\n  values: '{' '.join(vals)}'")
    path.write_text("# recorded by tests/integration/record_monitoring.py, one sample per "
                    f"{SCRAPE_EVERY:g} s\n" + "\n".join(lines) + "\n")


class Phases:
    """Writes each phase's series as soon as it is recorded."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir

    def __setitem__(self, name: str, samples: list[Sample]) -> None:
        write_series(self.outdir / f"series-{name}.yaml", samples)
        print(f"{name}: {len(samples)} samples, {len(samples[0])} series", flush=True)


def _fmt(v: float) -> str:
    if v != v:
        return "_"
    if v in (float("inf"), float("-inf")):
        return "Inf" if v > 0 else "-Inf"  # the probe histogram's sum, after a timeout
    return repr(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)


def unbound_pid(lab: Lab, conf: Path) -> int:
    out = lab.node_run(["unbound-control", "-c", str(conf), "status"]).stdout
    return int(out.split("pid ")[1].split(")")[0])


def main(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    with Lab(LabConfig(proxy_mode=ProxyMode.IPTABLES, iptables="legacy")) as lab:
        work = Path(lab.workdir or "/tmp")
        state = work / "state"
        lock = work / "xtables.lock"
        lock.touch()
        args = [*nodelocal_args(lab, state), "--metrics-address", "127.0.0.1:9253",
                "--probe-interval", "1"]
        env = {**os.environ, "XTABLES_LOCKFILE": str(lock)}
        log = (work / "agent.log").open("w")
        agent = lab.popen_in(lab.node_netns, [sys.executable, "-m", "dnsguard", "run", *args],
                             stdout=log, stderr=subprocess.STDOUT, env=env)
        rec = Recorder(lab)
        conf = state / "unbound.conf"
        ready = "dnsguard_cache_intercepting"
        try:
            wait_for(lambda: rec.value(ready) == 1, timeout=30)
            wait_for(lambda: rec.value("dnsguard_cache_stats_up") == 1, timeout=30)
            phases = Phases(outdir)

            phases["healthy"] = rec.phase(20, lambda: lab.lookup_load(
                count=100000, concurrency=2, duration=95))
            (outdir / "metrics.txt").write_text(rec.body())

            pid = unbound_pid(lab, conf)
            os.kill(pid, signal.SIGSTOP)
            try:
                phases["failed-open"] = rec.phase(12)
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_for(lambda: rec.value(ready) == 1, timeout=60)

            def kill_three_times() -> None:
                for _ in range(3):
                    before = rec.value("dnsguard_cache_restarts_total")
                    os.kill(unbound_pid(lab, conf), signal.SIGKILL)
                    wait_for(lambda b=before: rec.value("dnsguard_cache_restarts_total") > b,
                             timeout=60)
                    wait_for(lambda: rec.value(ready) == 1, timeout=60)

            phases["restarting"] = rec.phase(14, kill_three_times)
            wait_for(lambda: rec.value(ready) == 1, timeout=60)

            dns0 = lab._dns_procs[0].pid  # the "." forwarder; ip netns exec execs dnsmasq

            def ask_outside() -> None:
                deadline = time.monotonic() + 70
                i = 0
                while time.monotonic() < deadline:
                    lab.pod_run(0, ["dig", "+time=2", "+tries=1", f"down{i}.example.org"],
                                check=False)
                    i += 1

            os.kill(dns0, signal.SIGSTOP)
            try:
                phases["upstream-down"] = rec.phase(15, ask_outside)
            finally:
                os.kill(dns0, signal.SIGCONT)

            names = work / "names.txt"
            names.write_text("".join(f"n{secrets.token_hex(6)}.example.org A\n"
                                     for _ in range(40000)))

            def storm() -> None:
                lab.pod_run(1, ["timeout", "95", "dig", "+time=1", "+tries=1", "+short",
                                "-f", str(names)], check=False, timeout=120)

            phases["nxdomain-storm"] = rec.phase(20, storm)

            holder = lock.open("w")

            def break_sync() -> None:
                fcntl.flock(holder, fcntl.LOCK_EX)
                # our own flush takes the machine's default lock, not the agent's
                lab.node_run(["iptables-legacy", "-w", "5", "-t", "raw", "-F"])

            try:
                phases["not-in-sync"] = rec.phase(12, break_sync)
            finally:
                fcntl.flock(holder, fcntl.LOCK_UN)
                holder.close()
            wait_for(lambda: rec.value("dnsguard_rules_in_sync") == 1, timeout=60)
        finally:
            agent.terminate()
            agent.wait(timeout=30)
            log.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
