"""Support for the fault suite (test_faults.py): agents, load phases, conntrack and DNS answers.

A fault run is one continuous open-loop lookup load from every pod (glibc getaddrinfo, A and
AAAA in parallel from one socket, a new lookup every few milliseconds whatever the others are
doing), cut into phases by the moments the test acts (steady, fault injected, healed). Each
phase reports its lookups (by start time), failures, lookups >= 1 s, and the conntrack entries
pods created towards the DNS ClusterIP while it lasted (those entries are deleted at each
boundary): dnsguard's path creates none, so any entry is a lookup that lapsed to kube-proxy's
path.

Only pods' entries are counted: the agent itself may query the ClusterIP through kube-proxy's
path on purpose (its comparison probe), and that is not a pod's lookup lapsing.

Flags introduced by issue 12 (``--serve-stale``, ``--lock-file``) are passed only when the
dnsguard under test knows them, so the suite also runs on the code before the fix, which is
how its BEFORE figures are taken; every row records the flags it ran with.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dnsguard.stats import SLOW_SECONDS
from dnsguard.testing.lab import Lab, LoadRun, pod_ip
from dnsguard.testing.lookups import Sample
from tests.support.lab_helpers import dnsguard, status, wait_for

#: Tools whose reads the "slow table reads" fault slows down (see `SlowReads`).
READ_TOOLS = ("iptables-nft-save", "ip6tables-nft-save", "iptables-save", "ip6tables-save",
              "iptables-legacy-save", "ip6tables-legacy-save")

_FLAGS: dict[str, frozenset[str]] = {}


def run_flags(lab: Lab) -> frozenset[str]:
    """The long options ``dnsguard run`` accepts (asked once per process)."""
    if "run" not in _FLAGS:
        out = dnsguard(lab, "run", "--help").stdout
        _FLAGS["run"] = frozenset(re.findall(r"(--[a-z][a-z0-9-]+)", out))
    return _FLAGS["run"]


def with_optional(lab: Lab, args: list[str], *optional: tuple[str, str]) -> list[str]:
    """``args`` plus each (flag, value) this dnsguard knows and ``args`` lacks."""
    known = run_flags(lab)
    out = list(args)
    for flag, value in optional:
        if flag in known and flag not in out:
            out += [flag, value]
    return out


def lock_flag(lab: Lab, state: Path) -> tuple[str, str]:
    """A per-agent lock file: the default one under /run is shared by every lab on the host."""
    del lab
    return ("--lock-file", str(state / "agent.lock"))


class Agent:
    """``dnsguard run`` on a lab node, with its own environment (PATH for `SlowReads`)."""

    def __init__(self, lab: Lab, args: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.lab = lab
        self.args = list(args)
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> Agent:
        """Start and wait until the cache is intercepting; the log is quoted on failure."""
        with self.log.open("a") as out:
            self.proc = self.lab.popen_in(
                self.lab.node_netns, [sys.executable, "-m", "dnsguard", "run", *self.args],
                stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.wait_intercepting(timeout)
        return self

    def wait_intercepting(self, timeout: float = 30.0) -> float:
        try:
            return wait_for(lambda: self.cache().get("intercepting") is True, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"agent not intercepting within {timeout}s; status "
                                 f"{self.cache()}; log:\n{self.log_tail()}") from None

    def cache(self) -> dict[str, Any]:
        try:
            doc = status(self.lab, self.args).get("cache")
        except json.JSONDecodeError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as an OOM kill does: no handler runs."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def cleanup(lab: Lab, state: Path) -> None:
    """``dnsguard cleanup`` for an agent that is gone (killed or stopped), then check the node
    holds nothing of dnsguard's."""
    args = ["cleanup", "--state-dir", str(state)]
    res = dnsguard(lab, *with_optional(lab, args, lock_flag(lab, state)))
    assert res.returncode == 0, res.stderr
    assert lab.node_run(["ip", "link", "show", "dnsguard0"], check=False).returncode != 0


def unbound_stats(lab: Lab, state: Path) -> dict[str, float]:
    out = lab.node_run(["unbound-control", "-c", str(state / "unbound.conf"),
                        "stats_noreset"]).stdout
    return {k: float(v) for k, v in (ln.split("=", 1) for ln in out.splitlines() if "=" in ln)}


def pod_conntrack(lab: Lab) -> int:
    """Conntrack entries on the node from a client pod to a DNS ClusterIP, port 53."""
    pods = {str(pod_ip(i, f)) for i in range(len(lab.pod_netns)) for f in lab.families}
    total = 0
    for ip in lab.dns_ips:
        fam = "ipv6" if ip.version == 6 else "ipv4"
        out = lab.node_run(["conntrack", "-L", "-f", fam, "--orig-dst", str(ip)],
                           check=False).stdout
        for ln in out.splitlines():
            src = re.search(r"\bsrc=(\S+)", ln)
            if re.search(r"\bdport=53\b", ln) and src and src.group(1) in pods:
                total += 1
    return total


def reset_conntrack(lab: Lab) -> None:
    """Delete the node's conntrack entries towards the DNS ClusterIPs, and only those.

    A full flush (``conntrack -F``) would also cut the cache's own upstream TCP connections
    mid-stream, a disturbance of its own that would blur what the phase measures.
    """
    for ip in lab.dns_ips:
        fam = "ipv6" if ip.version == 6 else "ipv4"
        # exit status 1 when there was nothing to delete
        lab.node_run(["conntrack", "-D", "-f", fam, "--orig-dst", str(ip)], check=False)


# ------------------------------------------------------------------------------ phases

@dataclass
class PhaseStats:
    name: str
    start: float
    end: float
    lookups: int = 0
    failed: int = 0
    slow: int = 0
    conntrack: int = 0


@dataclass
class FaultRow:
    """One fault on one backend: what the table prints and the JSON keeps."""

    fault: str
    backend: str
    phases: list[PhaseStats]
    #: seconds from the injection until every lookup started from then on succeeded in < 1 s
    #: (None: never within the run)
    recovery: float | None
    unfinished: int
    flags: list[str]
    notes: dict[str, Any] = field(default_factory=dict)

    def phase(self, name: str) -> PhaseStats:
        return next(p for p in self.phases if p.name == name)

    def total(self, attr: str) -> int:
        return sum(int(getattr(p, attr)) for p in self.phases)


HEADER = (f"{'fault':<26} {'backend':<13} {'lookups':>7} {'failed':>6} {'>=1s':>5} "
          f"{'conntrack':>9} {'recovery':>8}   per phase (lookups/failed/>=1s/conntrack)")


def format_row(row: FaultRow) -> str:
    rec = "never" if row.recovery is None else f"{row.recovery:.2f}s"
    per = "  ".join(f"{p.name} {p.lookups}/{p.failed}/{p.slow}/{p.conntrack}"
                    for p in row.phases)
    return (f"{row.fault:<26} {row.backend:<13} {row.total('lookups'):>7} "
            f"{row.total('failed'):>6} {row.total('slow'):>5} {row.total('conntrack'):>9} "
            f"{rec:>8}   {per}")


def report(row: FaultRow, out_dir: Path) -> None:
    """Print the row (``pytest -s``) and keep it as JSON under the test's tmp_path, and in
    ``$DNSGUARD_FAULTS_JSON`` (one JSON document per line) when that is set."""
    print(f"\n{HEADER}\n{format_row(row)}")
    for k, v in row.notes.items():
        print(f"  {k}: {v}")
    doc = json.dumps(asdict(row), sort_keys=True)
    (out_dir / f"fault-{row.fault}-{row.backend}.json").write_text(doc + "\n")
    if target := os.environ.get("DNSGUARD_FAULTS_JSON"):
        with open(target, "a") as f:
            f.write(doc + "\n")


def recovery(samples: Sequence[Sample], since: float) -> float | None:
    """Seconds from ``since`` until every lookup started from then on succeeded in < 1 s."""
    later = [s for s in samples if s.start >= since]
    bad = [s for s in later if not s.ok or s.latency >= SLOW_SECONDS]
    if not later:
        return None
    if not bad:
        return 0.0
    last_bad = max(s.start for s in bad)
    if not any(s.start > last_bad for s in later):
        return None
    return last_bad - since


class PhasedLoad:
    """Continuous load from every pod, cut into named phases by `next_phase`.

    Entries to the ClusterIP are deleted at each boundary and counted at the next, so each
    phase's conntrack figure is what pods' lookups created during it.
    """

    def __init__(self, lab: Lab, names: Sequence[str], seconds: float, *,
                 interval: float = 0.02, max_in_flight: int = 1000, grace: float = 12.0) -> None:
        self.lab = lab
        self.run: LoadRun = lab.start_lookup_load(
            names=names, duration=seconds, interval=interval, concurrency=max_in_flight,
            grace=grace)
        self.began = time.monotonic()
        self.ends_by = self.began + seconds
        self.phases: list[PhaseStats] = []

    def next_phase(self, name: str) -> float:
        """Close the current phase (count its conntrack entries) and open ``name``."""
        now = time.monotonic()
        if self.phases:
            self.phases[-1].end = now
            self.phases[-1].conntrack = pod_conntrack(self.lab)
        reset_conntrack(self.lab)
        self.phases.append(PhaseStats(name, time.monotonic(), 0.0))
        return self.phases[-1].start

    def until(self, t: float) -> None:
        """Let the load run until monotonic time ``t`` (a phase's length, not a wait for a
        condition: the load is the measurement)."""
        time.sleep(max(t - time.monotonic(), 0.0))

    def finish(self) -> tuple[list[PhaseStats], list[Sample], int]:
        """Wait for the workers; assign each lookup to the phase it started in."""
        self.until(self.ends_by)
        if self.phases:
            self.phases[-1].end = time.monotonic()
            self.phases[-1].conntrack = pod_conntrack(self.lab)
        res = self.run.result()
        samples = list(res.samples)
        for s in samples:
            ph = next((p for p in reversed(self.phases) if s.start >= p.start), None)
            if ph is None or s.start > ph.end:
                continue  # interpreter start-up, before the first phase
            ph.lookups += 1
            ph.failed += 0 if s.ok else 1
            ph.slow += 1 if s.ok and s.latency >= SLOW_SECONDS else 0
        return self.phases, samples, res.unfinished


# ------------------------------------------------------------------------------ slow reads

class SlowReads:
    """Wrappers for the table-reading tools, first on the agent's PATH: while ``slow`` exists
    each read sleeps `seconds` and then execs the real tool (writes are never slowed, so the
    switch refresh itself, ``nft -f``, keeps its normal speed)."""

    def __init__(self, directory: Path, seconds: float = 5.0) -> None:
        self.dir = directory
        self.flag = directory / "slow"
        directory.mkdir(parents=True, exist_ok=True)
        for tool in READ_TOOLS:
            real = shutil.which(tool)
            if real:
                self._write(tool, f'[ -e "{self.flag}" ] && sleep {seconds}\nexec {real} "$@"\n')
        nft = shutil.which("nft")
        if nft:
            self._write("nft", f'if [ -e "{self.flag}" ]; then case " $* " in *" list "*) '
                               f'sleep {seconds};; esac; fi\nexec {nft} "$@"\n')

    def _write(self, name: str, body: str) -> None:
        path = self.dir / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.dir}{os.pathsep}{env.get('PATH', '')}"
        return env

    def on(self) -> None:
        self.flag.touch()

    def off(self) -> None:
        self.flag.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ dig

@dataclass(frozen=True)
class Answer:
    """What a pod sees: the rcode and the sorted answer records (type, data), TTLs left out."""

    rcode: str
    records: tuple[tuple[str, str], ...]
    msec: int | None = None

    def same(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.rcode, self.records


def dig(lab: Lab, pod: int, server: str, name: str, qtype: str = "A",
        timeout: float = 3.0) -> Answer:
    """One query from a pod's namespace; rcode ``TIMEOUT`` when nothing answered."""
    cp = lab.pod_run(pod, ["dig", f"+time={int(timeout)}", "+tries=1", "+noall", "+comments",
                           "+answer", "+stats", f"@{server}", name, qtype],
                     check=False, timeout=timeout + 10)
    m = re.search(r"status: ([A-Z]+)", cp.stdout)
    if not m:
        return Answer("TIMEOUT", ())
    records = []
    for ln in cp.stdout.splitlines():
        if not ln or ln.startswith(";"):
            continue
        parts = ln.split()
        if len(parts) >= 5 and parts[2] == "IN":
            records.append((parts[3], " ".join(parts[4:]).lower()))
    ms = re.search(r"Query time: (\d+) msec", cp.stdout)
    return Answer(m.group(1), tuple(sorted(records)), int(ms.group(1)) if ms else None)


def signal_pid(pid: int, sig: signal.Signals) -> bool:
    """Signal a process the test started (directly or as the agent's child); False if gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True



def link_state(lab: Lab, addrs: Sequence[str]) -> str:
    """``ok`` when dnsguard0 exists, is administratively up and holds every address in
    ``addrs``; else what is wrong (a test's message)."""
    cp = lab.node_run(["ip", "-o", "link", "show", "dnsguard0"], check=False)
    if cp.returncode != 0:
        return "link missing"
    flags = re.search(r"<([^>]*)>", cp.stdout)
    if not flags or "UP" not in flags.group(1).split(","):
        return f"link down: {cp.stdout.strip()}"
    have = lab.node_run(["ip", "-o", "addr", "show", "dev", "dnsguard0"]).stdout
    missing = [a for a in addrs if f" {a}/" not in have]
    return f"addresses missing: {missing}" if missing else "ok"


class StatsPoller:
    """unbound's query and cache-hit counters summed over a period, polled in the background.

    ``unbound-control reload`` restarts unbound's counters from zero, so a before/after delta
    would hide exactly the flushes a rollout test looks for; polling every `every` seconds and
    taking a drop as a reset loses at most one interval's queries per reload (counted in
    `resets`).
    """

    KEYS = ("total.num.queries", "total.num.cachehits")

    def __init__(self, lab: Lab, state: Path, every: float = 0.25) -> None:
        self.lab = lab
        self.state = state
        self.every = every
        self.totals = dict.fromkeys(self.KEYS, 0.0)
        self.resets = 0
        self._last = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _read(self) -> dict[str, float]:
        stats = unbound_stats(self.lab, self.state)
        return {k: stats.get(k, 0.0) for k in self.KEYS}

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._account()

    def _account(self) -> None:
        try:
            now = self._read()
        except Exception:  # unbound reloading right now: the next poll sees it
            return
        if now["total.num.queries"] < self._last["total.num.queries"]:
            self.resets += 1
            base = dict.fromkeys(self.KEYS, 0.0)
        else:
            base = self._last
        for k in self.KEYS:
            self.totals[k] += now[k] - base[k]
        self._last = now

    def stop(self) -> tuple[float, float]:
        """(queries, cache hits) since the poller started."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._account()
        return self.totals["total.num.queries"], self.totals["total.num.cachehits"]
