"""``dnsguard-lab demo``: the README's main job, on a simulated node built in namespaces.

It builds a lab node (kube-proxy in iptables mode, real dnsmasq "CoreDNS" pods), measures pods'
DNS through kube-proxy, shows that NOTRACK to the ClusterIP is refused there, runs dnsguard's
node-local cache and measures again, kills the cache to show the fall-back, stops the agent and
checks the node's rules are as before. Then, inside Debian's stock kernel under qemu (this
kernel has no IPVS), it shows NOTRACK in IPVS mode taking conntrack entries to zero. Everything
is torn down at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dnsguard.model import ProxyMode
from dnsguard.stats import Summary
from dnsguard.testing import vm
from dnsguard.testing.lab import Lab, LabConfig, dns_pod_ip

__all__ = ["main"]

PODS = 4
CONCURRENCY = 8
COUNT = 400  # per pod: 1600 lookups per path


@dataclass
class Row:
    path: str
    summary: Summary
    rate: float
    entries: int

    def line(self) -> str:
        s = self.summary
        return (f"{self.path:<34} {s.count:>7} {self.rate:>9.0f} {s.p50 * 1000:>7.2f} "
                f"{s.p99 * 1000:>7.2f} {s.max * 1000:>8.1f} {s.slow:>5} {s.failed:>6} "
                f"{self.entries:>9}")


HEADER = (f"{'path':<34} {'lookups':>7} {'lookups/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>8} {'>=1s':>5} {'failed':>6} {'conntrack':>9}")
#: what the conntrack column counts
CONNTRACK_NOTE = "conntrack: entries pods' lookups created towards the DNS ClusterIP"


def _say(text: str) -> None:
    print(text, flush=True)


def _dnsguard(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return lab.node_run([sys.executable, "-m", "dnsguard", *args], check=False, timeout=120)


def _measure(lab: Lab, path: str) -> Row:
    """Load from every pod; count the conntrack entries pods' DNS made (to the ClusterIP)."""
    lab.flush_conntrack()
    result = lab.lookup_load(count=COUNT, concurrency=CONCURRENCY, duration=30)
    out = lab.node_run(["conntrack", "-L", "--orig-dst", str(lab.dns_ips[0])], check=False)
    entries = sum(1 for ln in out.stdout.splitlines() if "dport=53 " in ln)
    return Row(path, result.summary(), result.rate, entries)


def _nodelocal_args(lab: Lab, state: Path) -> list[str]:
    resolv = state / "node-resolv.conf"
    state.mkdir(parents=True, exist_ok=True)
    resolv.write_text(f"nameserver {dns_pod_ip(0)}\n")  # a lab address, never the host's
    args = ["--mitigation", "nodelocal", "--state-dir", str(state), "--sync-interval", "2",
            "--node-resolv-conf", str(resolv)]
    for ip in lab.dns_ips:
        args += ["--dns-ip", str(ip)]
    for ip in lab.dns_endpoints:
        args += ["--upstream", f"[{ip}]:53" if ip.version == 6 else str(ip)]
    return args


def _status(lab: Lab, args: Sequence[str]) -> dict[str, Any]:
    out = _dnsguard(lab, "status", "--json", *args).stdout
    try:
        doc: dict[str, Any] = json.loads(out)
    except ValueError:
        return {}
    return doc


def _cache(lab: Lab, args: Sequence[str]) -> dict[str, Any]:
    cache = _status(lab, args).get("cache")
    return cache if isinstance(cache, dict) else {}


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def _recovery(lab: Lab, kill: Sequence[int]) -> float:
    """Kill ``kill``; seconds until a pod's lookup succeeds again (1 s resolver timeout)."""
    code = ("import socket,time,sys\n"
            "t0=float(sys.argv[1])\n"
            "while time.time()-t0<30:\n"
            "  try:\n"
            "    socket.getaddrinfo('svc-1.default.svc.cluster.local.',None);"
            "print(time.time()-t0);break\n"
            "  except OSError: time.sleep(0.05)\n")
    t0 = time.time()
    for pid in kill:
        os.kill(pid, signal.SIGKILL)
    out = lab.pod_run(0, [sys.executable, "-c", code, str(t0)], check=False, timeout=60).stdout
    return float(out.strip() or "nan")


def demo_node(work: Path) -> list[Row]:
    rows: list[Row] = []
    cfg = LabConfig(proxy_mode=ProxyMode.IPTABLES, iptables="nft", pods=PODS, names=64)
    _say(f"== Building a lab node: kube-proxy iptables mode (iptables-nft), {PODS} pods, "
         "2 CoreDNS pods (dnsmasq)")
    with Lab(cfg) as lab:
        _say(f"   node netns {lab.node_netns}, DNS ClusterIP {lab.dns_ips[0]}, "
             f"CoreDNS endpoints {', '.join(map(str, lab.dns_endpoints))}")
        before = lab.save_rules()

        _say(f"\n== 1. Pods resolve through kube-proxy ({PODS} pods x {CONCURRENCY} threads, "
             "glibc getaddrinfo: A+AAAA in parallel from one socket)")
        rows.append(_measure(lab, "kube-proxy iptables mode"))
        _say(HEADER)
        _say(rows[-1].line())

        _say("\n== 2. The classic fix, NOTRACK for DNS, on this node")
        args = ["apply", "--mitigation", "notrack", "--dns-ip", str(lab.dns_ips[0]),
                "--pod-cidr", str(lab.pod_cidrs[0])]
        res = _dnsguard(lab, *args)
        err = [ln for ln in res.stderr.splitlines() if ln.startswith("dnsguard: error")]
        _say(f"   $ dnsguard {' '.join(args)}")
        _say(f"   exit {res.returncode}: {err[0] if err else res.stderr.strip()}")
        _say(f"   rules unchanged: {'yes' if lab.save_rules() == before else 'NO'}")

        _say("\n== 3. dnsguard node-local cache: same ClusterIP, no conntrack, fails open")
        state = work / "state"
        nl = _nodelocal_args(lab, state)
        log = (work / "agent.log").open("w")
        agent = lab.popen_in(lab.node_netns, [sys.executable, "-m", "dnsguard", "run", *nl],
                             stdout=log, stderr=subprocess.STDOUT)
        log.close()
        try:
            if not _wait(lambda: _cache(lab, nl).get("intercepting") is True, 30):
                raise SystemExit("the agent did not become healthy: see " + str(work))
            _say(f"   $ dnsguard run {' '.join(nl)}")
            _say("   cache healthy, intercepting DNS to 169.254.20.10 and the ClusterIP")
            rows.append(_measure(lab, "dnsguard node-local (iptables mode)"))
            _say(HEADER)
            for row in rows:
                _say(row.line())
            for r in lab.pod_netns:  # short resolver timeout: measure fall-back, not glibc's 5 s
                conf = Path("/etc/netns") / r / "resolv.conf"
                conf.write_text(conf.read_text().replace("options ndots:5",
                                                         "options ndots:5 timeout:1 attempts:1"))
            took = _recovery(lab, [int(_cache(lab, nl)["pid"])])
            _say(f"\n   kill -9 of the cache: a pod's lookup succeeds again after {took:.2f}s "
                 "(interception withdrawn at once, kube-proxy's path answers)")
            _wait(lambda: _cache(lab, nl).get("intercepting") is True, 30)
            restarts = _cache(lab, nl).get("restarts")
            _say(f"   the agent restarted the cache ({restarts} restart), interception resumed")
        finally:
            agent.terminate()
            rc = agent.wait(timeout=30)
        same = lab.save_rules() == before
        _say(f"   SIGTERM: agent exit {rc}; node's rules identical to before: "
             f"{'yes' if same else 'NO'}")
    _say("   lab torn down")
    return rows


def demo_ipvs(work: Path) -> None:
    _say("\n== 4. kube-proxy IPVS mode, in Debian's stock kernel under qemu "
         "(this kernel has no IPVS)")
    reason = vm.available()
    if reason is not None:
        _say(f"   skipped: {reason}")
        return
    vm.prepare()
    script = f"cd {Path.cwd()} && {sys.executable} -m dnsguard.testing.lab_cli ipvs-part"
    result = vm.run(script, timeout=900, cwd=Path.cwd())
    lines = [ln for ln in result.output.splitlines() if ln.startswith("{")]
    if result.returncode != 0 or not lines:
        _say(f"   failed (exit {result.returncode}):\n{result.output[-2000:]}")
        return
    doc = json.loads(lines[-1])
    _say(f"   {doc['lookups']} lookups through IPVS (software emulation: counts, not speed)")
    _say(f"   kube-proxy ipvs mode:            {doc['before']} conntrack entries for port 53")
    _say(f"   with dnsguard notrack:           {doc['after']} conntrack entries "
         f"({doc['failed']} failed lookups)")
    _say(f"   {doc['applied']}")


def ipvs_part() -> int:
    """Inside the guest: NOTRACK in IPVS mode, before and after, as one JSON line."""
    with Lab(LabConfig(proxy_mode=ProxyMode.IPVS, iptables="nft")) as lab:
        n = 20
        lab.flush_conntrack()
        lab.lookup_load(pods=[0], count=n, concurrency=1, duration=120)
        before = lab.conntrack_entries()
        res = _dnsguard(lab, "apply", "--mitigation", "notrack", "--dns-ip",
                        str(lab.dns_ips[0]), "--pod-cidr", str(lab.pod_cidrs[0]))
        if res.returncode != 0:
            print(res.stderr, file=sys.stderr)
            return 1
        lab.flush_conntrack()
        after = lab.lookup_load(pods=[0], count=n, concurrency=1, duration=120)
        doc = {"lookups": n, "before": before, "after": lab.conntrack_entries(),
               "failed": after.summary().failed,
               "applied": "dnsguard apply: " + res.stdout.strip()}
        _dnsguard(lab, "cleanup")
    print(json.dumps(doc))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dnsguard-lab", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the README's main job (about 3 minutes)")
    d.add_argument("--no-vm", action="store_true", help="skip the IPVS part under qemu")
    sub.add_parser("ipvs-part", help=argparse.SUPPRESS)
    sub.add_parser("remove-stale", help="remove namespaces left by a crashed lab run")
    args = p.parse_args(argv)
    if args.command == "ipvs-part":
        return ipvs_part()
    if args.command == "remove-stale":
        removed = Lab.remove_stale()
        print("removed: " + (", ".join(removed) or "nothing"))
        return 0
    if os.geteuid() != 0:
        print("dnsguard-lab: error: the lab needs root (network namespaces)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dnsguard-demo-") as tmp:
        rows = demo_node(Path(tmp))
        if not args.no_vm:
            demo_ipvs(Path(tmp))
    _say("\n== Summary (this machine, this run)")
    _say(HEADER)
    for row in rows:
        _say(row.line())
    _say(CONNTRACK_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
