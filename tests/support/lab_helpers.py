"""Running the real dnsguard CLI and agent inside a lab node, for the integration tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from dnsguard.model import Backend, ProxyMode
from dnsguard.testing.lab import Lab, dns_pod_ip

#: (proxy mode, kube-proxy's iptables flavour) -> the backend dnsguard should pick
VARIANTS = {
    "iptables-legacy": (ProxyMode.IPTABLES, "legacy", Backend.IPTABLES_LEGACY),
    "iptables-nft": (ProxyMode.IPTABLES, "nft", Backend.IPTABLES_NFT),
    "nftables": (ProxyMode.NFTABLES, "nft", Backend.NFTABLES),
}


#: the commands that take the node lock (node/lock.py)
LOCKING = ("run", "apply", "cleanup")


def lock_file(lab: Lab) -> Path:
    """The lab node's lock: shared by every dnsguard on that node, never by two labs.

    The default, /run/dnsguard/agent.lock, is the machine's own /run (network namespaces do
    not separate files): parallel labs would wait for, or be refused by, each other's agents.
    """
    assert lab.workdir is not None, "the lab is not started"
    return lab.workdir / "agent.lock"


def _with_lock(lab: Lab, args: Sequence[str]) -> list[str]:
    """``args`` with the lab's lock file when the command takes the lock and none was given."""
    if args and args[0] in LOCKING and "--lock-file" not in args:
        return [*args, "--lock-file", str(lock_file(lab))]
    return list(args)


def dnsguard(lab: Lab, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """One dnsguard command on the lab's node (its own network namespace)."""
    return lab.node_run([sys.executable, "-m", "dnsguard", *_with_lock(lab, args)], check=False,
                        timeout=timeout)


def nodelocal_args(lab: Lab, state: Path, upstreams: Sequence[str] | None = None) -> list[str]:
    """Flags for node-local mode on a lab node: endpoints as upstreams, lab-only resolv.conf."""
    resolv = state / "node-resolv.conf"
    state.mkdir(parents=True, exist_ok=True)
    # names outside the cluster go to a lab DNS pod, never to the host's resolver
    resolv.write_text(f"nameserver {dns_pod_ip(0)}\n")
    args = ["--mitigation", "nodelocal", "--state-dir", str(state),
            "--node-resolv-conf", str(resolv), "--sync-interval", "1",
            "--lock-file", str(lock_file(lab))]
    for ip in lab.dns_ips:
        args += ["--dns-ip", str(ip)]
    if upstreams is None:
        upstreams = [f"[{ip}]:53" if ip.version == 6 else str(ip) for ip in lab.dns_endpoints]
    for up in upstreams:
        args += ["--upstream", up]
    return args


def without_empty_legacy_tables(snapshot: str) -> str:
    """Drop iptables-legacy tables holding only empty built-in chains with ACCEPT policies.

    The legacy kernel tables, once a rule has been written to them in a namespace, stay
    instantiated until the namespace goes away; an empty one is exactly as if absent, but
    ``iptables-legacy-save`` still prints it. Only the legacy sections are normalised: for
    iptables-nft and nft the snapshots must be identical as printed.
    """
    out: list[str] = []
    section = ""
    table: list[str] = []
    for line in snapshot.splitlines():
        if line.startswith("### "):
            section = line
        if "legacy" in section and line.startswith("*"):
            table = [line]
            continue
        if table:
            table.append(line)
            if line == "COMMIT":
                body = table[1:-1]
                empty = all(ln.startswith(":") and " ACCEPT " in ln for ln in body)
                if not empty:
                    out.extend(table)
                table = []
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def status(lab: Lab, args: Sequence[str]) -> dict[str, object]:
    res = dnsguard(lab, "status", "--json", *args)
    doc: dict[str, object] = json.loads(res.stdout)
    return doc


def wait_for(pred: Callable[[], bool], timeout: float, step: float = 0.1) -> float:
    """Seconds until ``pred`` held; raises AssertionError after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def start_agent(lab: Lab, args: Sequence[str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return lab.popen_in(lab.node_netns,
                            [sys.executable, "-m", "dnsguard", *_with_lock(lab, ["run", *args])],
                            stdout=out, stderr=subprocess.STDOUT)


def stop_agent(proc: subprocess.Popen[str], timeout: float = 20.0) -> int:
    proc.terminate()
    return proc.wait(timeout=timeout)


def conntrack_to(lab: Lab, addr: str, port: int = 53) -> int:
    """Entries on the node whose original destination is ``addr:port`` (UDP or TCP): lookups
    that took kube-proxy's path.

    The agent's own queries are left out: its health query before the first sync and its
    probe of kube-proxy's path (only while the cache cannot reach the cluster DNS) leave the
    node from the intercepted address itself (it is local on dnsguard0), so they carry
    ``src=ADDR``; no pod's lookup does.
    """
    fam = "ipv6" if ":" in addr else "ipv4"
    out = lab.node_run(["conntrack", "-L", "-f", fam, "--orig-dst", addr], check=False).stdout
    return sum(1 for ln in out.splitlines()
               if re.search(rf"\bdport={port}\b", ln) and ln.split()[0] in ("udp", "tcp")
               and _orig_src(ln) != addr)


def _orig_src(line: str) -> str:
    """The original direction's source in a ``conntrack -L`` line (the first ``src=``)."""
    m = re.search(r"\bsrc=(\S+)", line)
    return m.group(1) if m else ""


#: Sends one operation to the fake API server: ``call("put_service", ns, name, ips, ...)``.
ApiCall = Callable[..., None]


@contextlib.contextmanager
def fake_api(lab: Lab, kubeconfig: Path) -> Iterator[ApiCall]:
    """A fake Kubernetes API server in the lab node's namespace (tests/integration/fake_api_proc.py).

    It must run there: the agent reaches it on 127.0.0.1 of that namespace. Each call names a
    `FakeApiServer` method and its JSON arguments, and waits for the server's ``ok``.
    """
    here = Path(__file__).resolve().parents[1] / "integration"  # fake_api_proc.py's home
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.node_netns, sys.executable, str(here / "fake_api_proc.py"),
         str(kubeconfig)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdin is not None
    stdin, stdout = proc.stdin, proc.stdout
    try:
        assert stdout.readline().strip() == "ok"

        def call(op: str, *args: object, **kw: object) -> None:
            stdin.write(json.dumps({"op": op, "args": list(args), "kw": kw}) + "\n")
            stdin.flush()
            answer = stdout.readline().strip()
            assert answer == "ok", f"fake API {op}: {answer}"

        yield call
    finally:
        stdin.close()
        proc.terminate()
        proc.wait(timeout=10)
        stdout.close()
