"""kube-proxy IPVS mode without and with ``dnsguard apply --mitigation notrack``, under qemu.

This machine's kernel has no IPVS, so this part boots Debian's stock kernel with
`dnsguard.testing.vm` and runs ``python -m bench.ipvs guest`` inside it: an IPVS-mode lab
node (kube-ipvs0, ipvsadm services, kube-proxy's ipvs-mode iptables rules), the same name mix
from two pods, first as kube-proxy leaves it, then after ``dnsguard apply`` wrote its NOTRACK
rules, then ``dnsguard cleanup``. The guest writes one JSON document to ``$DNSGUARD_VM_OUT``.

qemu emulates the CPU in software here (TCG), so rates and latencies mean nothing; the report
gives what does: conntrack entries per lookup, errors, timeouts and lookups >= 1 s. Loads are
bounded by a lookup count (and a generous duration) for that reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.node import REPO, PathNode, worker_env
from bench.results import CT_COUNTERS, counter_deltas, summarize_load
from bench.spec import Load, PathSpec, lookup_names
from dnsguard.model import ProxyMode
from dnsguard.node.conntrack import kernel_release

__all__ = ["guest_main", "run_in_vm"]

#: How long the guest may take (boot, lab, two loads, cleanup) before the host gives up.
VM_TIMEOUT = 900.0
#: Python under TCG starts in seconds, not milliseconds: workers get this long to start.
GUEST_START_LEAD = 12.0
#: dnsguard's CLI imports the Kubernetes client: ~15 s under TCG, more on a busy host.
GUEST_COMMAND_TIMEOUT = 300.0


def run_in_vm(lookups: int, concurrency: int, iptables: str) -> dict[str, object]:
    """Boot the VM, run the guest, return its JSON (raises `dnsguard.testing.vm.VMError`)."""
    from dnsguard.testing import vm  # noqa: PLC0415 - the VM harness only when used

    env = worker_env()
    script = (
        "set -e\n"
        f"cd {REPO}\n"
        f"export PYTHONPATH={env['PYTHONPATH']}\n"
        f"{sys.executable} -m bench.ipvs guest --out \"$DNSGUARD_VM_OUT/ipvs.json\" "
        f"--lookups {lookups} --concurrency {concurrency} --iptables {iptables}\n"
    )
    with tempfile.TemporaryDirectory(prefix="dnsguard-bench-vm-") as out:
        t0 = time.monotonic()
        res = vm.run(script, timeout=VM_TIMEOUT, out_dir=out, cwd=REPO)
        path = Path(out) / "ipvs.json"
        if not path.exists():
            raise vm.VMError(f"guest exited {res.returncode}:\n{res.output[-3000:]}",
                             output=res.output, console=res.console)
        doc: dict[str, object] = json.loads(path.read_text())
        doc["vm_seconds"] = round(time.monotonic() - t0, 1)
        if res.returncode != 0:  # measured, then failed (cleanup): keep both facts
            doc["guest_error"] = res.output[-2000:]
        return doc


def _phase(node: PathNode, load: Load, names: Sequence[str]) -> dict[str, object]:
    node.flush_conntrack()
    before = node.snapshot()
    workers = node.run_load(load, names)
    after = node.snapshot()
    stats = summarize_load(workers)
    created = (after.entries or 0) - (before.entries or 0)
    from_pods, other = node.conntrack_sources([str(ip) for ip in node.client_ips()])
    return {
        "lookups": stats.lookups, "timeouts": stats.timeouts, "errors": dict(stats.errors),
        "at_least_1s": stats.at_least_1s, "at_least_5s": stats.at_least_5s,
        "conntrack_entries_created": created,
        "conntrack_entries_from_pods": from_pods, "conntrack_entries_other": other,
        "conntrack_entries_per_lookup": round(from_pods / stats.lookups, 4)
        if stats.lookups else None,
        "conntrack": counter_deltas(before.conntrack, after.conntrack, CT_COUNTERS),
        "rcvbuf_errors": {k: after.rcvbuf[k] - before.rcvbuf.get(k, 0) for k in after.rcvbuf},
        "max_seconds": stats.max, "late_start_seconds": round(stats.late, 1),
    }


def guest_main(argv: Sequence[str]) -> int:
    """Inside the VM: IPVS lab, load without and with dnsguard's NOTRACK, JSON out."""
    p = argparse.ArgumentParser(prog="python -m bench.ipvs guest")
    p.add_argument("--out", required=True)
    p.add_argument("--lookups", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--iptables", default="nft")
    args = p.parse_args(argv)
    out = Path(args.out)
    spec = PathSpec("ipvs", "kube-proxy ipvs, ClusterIP", ProxyMode.IPVS)
    load = Load(pods=2, concurrency=args.concurrency, duration=300.0, count=args.lookups)
    names = lookup_names(16)
    doc: dict[str, object] = {"kernel": kernel_release(), "iptables": args.iptables,
                              "pods": load.pods, "concurrency": load.concurrency}
    with tempfile.TemporaryDirectory(prefix="bench-ipvs-") as tmp:
        node = PathNode(spec, pods=2, services=16, iptables=args.iptables, workdir=Path(tmp),
                        start_lead=GUEST_START_LEAD)
        with node:
            node.start()
            doc["without"] = _phase(node, load, names)
            cidrs = [a for c in node.lab.pod_cidrs for a in ("--pod-cidr", str(c))]
            ips = [a for ip in node.lab.dns_ips for a in ("--dns-ip", str(ip))]
            res = node.dnsguard("apply", "--mitigation", "notrack", *ips, *cidrs,
                                timeout=GUEST_COMMAND_TIMEOUT)
            doc["apply"] = {"returncode": res.returncode,
                            "output": (res.stdout + res.stderr).strip()[-2000:]}
            if res.returncode != 0:
                raise SystemExit(f"dnsguard apply failed: {res.stderr}")
            doc["with"] = _phase(node, load, names)
            out.write_text(json.dumps(doc, indent=2) + "\n")  # kept if cleanup fails
            res = node.dnsguard("cleanup", timeout=GUEST_COMMAND_TIMEOUT)
            doc["cleanup"] = {"returncode": res.returncode, "output": res.stdout.strip()}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["guest"]:
        sys.exit("usage: python -m bench.ipvs guest --out FILE [...] (runs inside the VM)")
    sys.exit(guest_main(sys.argv[2:]))
