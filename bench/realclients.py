"""Real resolvers as load: glibc's and musl's ``getaddrinfo`` from lab pods (``--only clients``).

The scenarios' load generator (`bench.worker`) imitates glibc's wire pattern in Python; what
pods actually run is a C library. ``bench/clients/lookup.c`` calls the library's own
``getaddrinfo`` from many threads, closed loop, and is built at run time into the run's
temporary directory twice: against glibc (``gcc``) and statically against musl
(``musl-gcc -static``, Alpine's resolver: parallel queries, 2.5 s retransmit). Binaries are
never committed; a missing compiler skips that kind with its reason.

Each kind runs from `PODS` pods x `THREADS` threads for `SECONDS` on two lab nodes built in
the same iptables flavour as the rest of the run: kube-proxy's ClusterIP path (the baseline)
and dnsguard's node-local path, with its defaults and without the per-client rate limit
(`CLIENT_PATHS`). Reported per kind and path: lookups/s (and its ratio to the
same kind on the baseline path, measured minutes apart in the same run), failed lookups,
lookups >= 1 s and >= 5 s, latency percentiles, conntrack entries to the ClusterIP left by the
run, and the DNS servers' receive-buffer drops. Then DNS-OARC's ``dnsperf`` (Debian package)
from one pod at fixed offered rates (``-Q``, `DNSPERF_RATES`) on every path: answered qps,
queries lost, latency, conntrack entries to the ClusterIP.

The parsing, merging and report rows are pure and unit-tested (tests/unit); `measure` is the
only part that touches namespaces. The client stops by itself: no lookup starts after its
duration and it exits `GRACE` seconds later, counting lookups still inside ``getaddrinfo`` as
*unfinished*; the host kills it by its Popen if it overruns even that.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.node import PathNode, last_lines
from bench.report import fmt_latency, fmt_ratio, markdown_table
from bench.results import CT_COUNTERS, counter_deltas, ratio
from bench.spec import BASELINE, PATHS
from dnsguard.testing.lab import LabError

__all__ = [
    "CLIENT_PATHS",
    "KINDS",
    "ClientOutput",
    "ClientPath",
    "ClientStats",
    "build",
    "compile_argv",
    "count_to",
    "describe",
    "dnsperf_data",
    "dnsperf_rows",
    "hist_percentile",
    "measure",
    "merge",
    "parse_dnsperf",
    "render",
    "rows",
    "run_clients",
]

log = logging.getLogger("bench.clients")

SOURCE = Path(__file__).resolve().parent / "clients" / "lookup.c"
KINDS = ("glibc", "musl")


@dataclass(frozen=True)
class ClientPath:
    """A path the clients run on: a `bench.spec.PATHS` node, and flags for its agent."""

    name: str
    spec: str
    title: str
    agent_flags: tuple[str, ...] = ()


#: kube-proxy's ClusterIP path (the baseline) and dnsguard's node-local path in the same proxy
#: mode; node-local once more without the cache's per-client rate limit (default 10k qps per
#: pod address, over which unbound drops 9 queries in 10): one client pod of this load sends
#: more than that, and each dropped query is a resolver retransmit (5 s glibc, 2.5 s musl).
CLIENT_PATHS = (
    ClientPath(BASELINE, BASELINE, "kube-proxy iptables, ClusterIP"),
    ClientPath("nodelocal-iptables", "nodelocal-iptables", "dnsguard node-local, defaults"),
    ClientPath("nodelocal-iptables-qps0", "nodelocal-iptables",
               "dnsguard node-local, --cache-client-qps 0", ("--cache-client-qps", "0")),
)
PODS = 4
THREADS = 32
SECONDS = 8.0
#: Seconds after the launch window before a client prints and exits without its stragglers:
#: room for a glibc lookup's second try (5 s) on each search-list step.
GRACE = 30.0
#: Seconds between spawning the clients and their agreed start.
START_LEAD = 1.0
#: dnsperf's fixed offered rates (``-Q``), seconds per rate, simulated clients (sockets),
#: queries outstanding at most, per-query timeout: from one pod, every path, rates interleaved.
DNSPERF_RATES = (10_000, 20_000, 40_000, 80_000, 160_000)
DNSPERF_SECONDS = 4.0
DNSPERF_CLIENTS = 16
DNSPERF_OUTSTANDING = 2000
DNSPERF_TIMEOUT = 2.0


def describe() -> str:
    """One line for ``python -m bench --list``."""
    return (f"clients: {', '.join(KINDS)} getaddrinfo, {PODS} pods x {THREADS} threads x "
            f"{SECONDS:g}s on {', '.join(p.name for p in CLIENT_PATHS)}; dnsperf -Q "
            f"{', '.join(f'{r:,}' for r in DNSPERF_RATES)} x {DNSPERF_SECONDS:g}s")


def compile_argv(kind: str, out: Path) -> list[str]:
    """The compiler command line for one kind: glibc dynamic, musl static."""
    common = ["-O2", "-Wall", "-pthread", "-o", str(out), str(SOURCE), "-lm"]
    if kind == "glibc":
        return ["gcc", *common]
    if kind == "musl":
        return ["musl-gcc", "-static", *common]
    raise ValueError(f"unknown client kind {kind!r}")


def build(out_dir: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Compile every kind into ``out_dir``: (binaries by kind, skip reasons by kind)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for kind in KINDS:
        out = out_dir / f"lookup-{kind}"
        argv = compile_argv(kind, out)
        if shutil.which(argv[0]) is None:
            skipped[kind] = f"{argv[0]} not installed (Debian: scripts/install-deps --dev)"
            continue
        cp = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        if cp.returncode != 0:
            skipped[kind] = f"{argv[0]} failed: {cp.stderr.strip()[-300:]}"
            continue
        built[kind] = out
    return built, skipped


def _int(doc: Mapping[str, Any], key: str) -> int:
    v = doc.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"client output: {key} must be a count, got {v!r}")
    return v


def _num(doc: Mapping[str, Any], key: str) -> float:
    v = doc.get(key)
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(f"client output: {key} must be a number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class ClientOutput:
    """One client process's report (one pod), as printed by lookup.c."""

    kind: str
    label: str
    threads: int
    seconds: float
    elapsed: float
    lookups: int
    failed: int
    ge_1s: int
    ge_5s: int
    unfinished: int
    max_seconds: float
    #: getaddrinfo's EAI_* return codes (negative, as both libcs define them) -> count
    errors: dict[int, int]
    #: answered lookups: (upper edge of the latency bin in seconds, count), edges ascending
    hist: tuple[tuple[float, int], ...]

    @classmethod
    def from_json(cls, line: str) -> ClientOutput:
        """Parse and check one output line; anything malformed is a ValueError, never a
        silently wrong count."""
        doc = json.loads(line)
        if not isinstance(doc, dict):
            raise ValueError("client output: not a JSON object")
        kind = doc.get("kind")
        if kind not in KINDS:
            raise ValueError(f"client output: unknown kind {kind!r}")
        errors_doc = doc.get("errors", {})
        hist_doc = doc.get("hist", [])
        if not isinstance(errors_doc, dict) or not isinstance(hist_doc, list):
            raise ValueError("client output: errors must be an object, hist a list")
        errors: dict[int, int] = {}
        for code, n in errors_doc.items():
            errors[int(code)] = _int({"n": n}, "n")
        hist: list[tuple[float, int]] = []
        for pair in hist_doc:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError(f"client output: bad histogram bin {pair!r}")
            hist.append((_num({"e": pair[0]}, "e") / 1e6, _int({"n": pair[1]}, "n")))
        if any(a[0] >= b[0] for a, b in itertools.pairwise(hist)):
            raise ValueError("client output: histogram edges must ascend")
        out = cls(kind=kind, label=str(doc.get("label", "")), threads=_int(doc, "threads"),
                  seconds=_num(doc, "seconds"), elapsed=_num(doc, "elapsed"),
                  lookups=_int(doc, "lookups"), failed=_int(doc, "failed"),
                  ge_1s=_int(doc, "ge_1s"), ge_5s=_int(doc, "ge_5s"),
                  unfinished=_int(doc, "unfinished"),
                  max_seconds=_int(doc, "max_us") / 1e6, errors=errors, hist=tuple(hist))
        answered = sum(n for _, n in out.hist)
        if answered + out.failed != out.lookups or sum(errors.values()) != out.failed:
            raise ValueError(f"client output: {answered} answered + {out.failed} failed != "
                             f"{out.lookups} lookups, or errors do not sum to failed")
        return out


@dataclass(frozen=True)
class ClientStats:
    """One kind on one path, merged over its pods."""

    kind: str
    pods: int
    threads: int
    seconds: float
    lookups: int
    failed: int
    #: lookups >= 1 s: finished ones that took that long, plus the unfinished
    ge_1s: int
    ge_5s: int
    unfinished: int
    rate: float
    #: percentiles of every lookup, failed and unfinished ones sorting last; None when the
    #: rank lands on one of those (never a fast-looking number)
    p50: float | None
    p99: float | None
    p999: float | None
    max_seconds: float
    errors: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "pods": self.pods, "threads": self.threads,
                "duration_seconds": self.seconds, "lookups": self.lookups,
                "failed": self.failed, "ge_1s": self.ge_1s, "ge_5s": self.ge_5s,
                "unfinished": self.unfinished, "lookups_per_second": round(self.rate, 1),
                "p50": self.p50, "p99": self.p99, "p999": self.p999,
                "max_seconds": self.max_seconds,
                "errors": {str(k): v for k, v in sorted(self.errors.items())}}


def hist_percentile(hist: Sequence[tuple[float, int]], unanswered: int,
                    q: float) -> float | None:
    """Nearest-rank ``q`` percentile (0 < q <= 100) of binned answered latencies plus
    ``unanswered`` lookups that sort above all of them; a bin's value is its upper edge.
    None when the rank falls on an unanswered lookup or there is nothing to rank."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    total = sum(n for _, n in hist) + unanswered
    if total == 0:
        return None
    rank = max(1, -(-round(q * 1000) * total // 100_000))  # ceil(q/100 * total), exact
    seen = 0
    for edge, n in sorted(hist):
        seen += n
        if seen >= rank:
            return edge
    return None


def merge(outputs: Sequence[ClientOutput], seconds: float) -> ClientStats:
    """Pods of one kind and path -> one row; the rate counts lookups finished over the launch
    window (every lookup starts inside it; stragglers finish within the grace period)."""
    if not outputs:
        raise ValueError("no client output to merge")
    kinds = {o.kind for o in outputs}
    if len(kinds) != 1:
        raise ValueError(f"cannot merge client kinds {sorted(kinds)}")
    bins: dict[float, int] = {}
    errors: dict[int, int] = {}
    for o in outputs:
        for edge, n in o.hist:
            bins[edge] = bins.get(edge, 0) + n
        for code, n in o.errors.items():
            errors[code] = errors.get(code, 0) + n
    hist = sorted(bins.items())
    failed = sum(o.failed for o in outputs)
    unfinished = sum(o.unfinished for o in outputs)
    lookups = sum(o.lookups for o in outputs)
    return ClientStats(
        kind=outputs[0].kind, pods=len(outputs), threads=outputs[0].threads, seconds=seconds,
        lookups=lookups, failed=failed, ge_1s=sum(o.ge_1s for o in outputs) + unfinished,
        ge_5s=sum(o.ge_5s for o in outputs), unfinished=unfinished,
        rate=lookups / seconds if seconds > 0 else 0.0,
        p50=hist_percentile(hist, failed + unfinished, 50),
        p99=hist_percentile(hist, failed + unfinished, 99),
        p999=hist_percentile(hist, failed + unfinished, 99.9),
        max_seconds=max(o.max_seconds for o in outputs), errors=errors)


def count_to(conntrack_list: str, ip: str) -> int:
    """``conntrack -L`` text -> entries whose original destination is ``ip`` (the first
    ``dst=`` of a line is the original direction's)."""
    n = 0
    for line in conntrack_list.splitlines():
        fields = line.split()
        if not fields or fields[0] not in ("udp", "tcp"):
            continue
        if next((f[4:] for f in fields if f.startswith("dst=")), None) == ip:
            n += 1
    return n


def dnsperf_data(names: Sequence[str]) -> str:
    """dnsperf's input: every absolute name of the mix, A then AAAA (dnsperf sends names as
    given, with no search list, so short names would only measure NXDOMAIN)."""
    fqdns = [n for n in names if n.endswith(".")]
    if not fqdns:
        raise ValueError("dnsperf needs absolute names (ending in a dot)")
    return "".join(f"{n} {t}\n" for n in fqdns for t in ("A", "AAAA"))


_DNSPERF_FIELDS = {
    "sent": (r"Queries sent:\s+(\d+)", int),
    "completed": (r"Queries completed:\s+(\d+)", int),
    "lost": (r"Queries lost:\s+(\d+)", int),
    "qps": (r"Queries per second:\s+([\d.]+)", float),
    "avg_latency": (r"Average Latency \(s\):\s+([\d.]+)", float),
    "max_latency": (r"Average Latency \(s\):.*max ([\d.]+)\)", float),
    "latency_stddev": (r"Latency StdDev \(s\):\s+([\d.]+)", float),
}


def parse_dnsperf(text: str) -> dict[str, float | int]:
    """dnsperf's closing statistics -> numbers; a missing field is a ValueError (a run that
    printed no statistics must not read as zero loss)."""
    out: dict[str, float | int] = {}
    for key, (pattern, conv) in _DNSPERF_FIELDS.items():
        m = re.search(pattern, text)
        if m is None:
            if key == "latency_stddev":
                continue
            raise ValueError(f"dnsperf output lacks {key!r}")
        out[key] = conv(m.group(1))
    if out["completed"] + out["lost"] != out["sent"]:
        raise ValueError("dnsperf output: completed + lost != sent")
    return out


# ------------------------------------------------------------------------------ report

HEADER = ["client", "path", "lookups/s", "vs kube-proxy", "failed", ">= 1 s", ">= 5 s",
          "unfinished", "p50", "p99", "p99.9", "max", "conntrack entries to ClusterIP",
          "RcvbufErrors"]


def _title(path: str) -> str:
    return next((p.title for p in CLIENT_PATHS if p.name == path), path)


def _rcvbuf(run: Mapping[str, Any]) -> str:
    rcv = run.get("rcvbuf_errors") or {}
    return ", ".join(f"{k} {v}" for k, v in sorted(rcv.items())) or "n/a"


def rows(section: Mapping[str, Any]) -> list[list[str]]:
    """Report rows, one per kind and path, in run order; the ratio is against the same kind
    on the baseline path of the same run ("-" when that one is missing)."""
    runs = section.get("runs", [])
    base = {r["kind"]: r["stats"]["lookups_per_second"] for r in runs
            if r.get("status") == "ok" and r["path"] == BASELINE}
    out = []
    for r in runs:
        if r.get("status") != "ok":
            out.append([r["kind"], _title(r["path"]), r.get("status", "?"),
                        r.get("reason", "")[:120]] + [""] * (len(HEADER) - 4))
            continue
        s = r["stats"]
        out.append([
            f"{r['kind']} ({s['pods']} pods x {s['threads']} threads)", _title(r["path"]),
            f"{s['lookups_per_second']:,.0f}",
            fmt_ratio(ratio(s["lookups_per_second"], base.get(r["kind"]))),
            str(s["failed"]), str(s["ge_1s"]), str(s["ge_5s"]), str(s["unfinished"]),
            fmt_latency(s["p50"]), fmt_latency(s["p99"]), fmt_latency(s["p999"]),
            fmt_latency(s["max_seconds"]),
            "n/a" if r.get("conntrack_to_cluster_ip") is None
            else f"{r['conntrack_to_cluster_ip']:,}",
            _rcvbuf(r),
        ])
    return out


DNSPERF_HEADER = ["offered qps (-Q)", "path", "answered qps", "vs kube-proxy", "lost",
                  "lost per million", "avg latency", "max latency",
                  "conntrack entries to ClusterIP", "RcvbufErrors"]


def dnsperf_rows(section: Mapping[str, Any]) -> list[list[str]]:
    """One row per offered rate and path; the ratio is answered qps against kube-proxy's path
    at the same offered rate in the same run."""
    runs = section.get("dnsperf", [])
    base = {r["rate"]: r["result"]["qps"] for r in runs
            if r.get("status") == "ok" and r["path"] == BASELINE}
    out = []
    for r in runs:
        if r.get("status") != "ok":
            out.append([f"{r['rate']:,}", _title(r["path"]), r.get("status", "?"),
                         r.get("reason", "")[:120]] + [""] * (len(DNSPERF_HEADER) - 4))
            continue
        res = r["result"]
        per_million = res["lost"] * 1e6 / res["sent"] if res["sent"] else None
        out.append([
            f"{r['rate']:,}", _title(r["path"]), f"{res['qps']:,.0f}",
            fmt_ratio(ratio(res["qps"], base.get(r["rate"]))), f"{res['lost']:,}",
            "-" if per_million is None else f"{per_million:,.0f}",
            fmt_latency(res["avg_latency"]), fmt_latency(res["max_latency"]),
            "n/a" if r.get("conntrack_to_cluster_ip") is None
            else f"{r['conntrack_to_cluster_ip']:,}",
            _rcvbuf(r),
        ])
    return out


def render(doc: Mapping[str, Any]) -> str:
    """The markdown section for a results document; empty when the part did not run."""
    section = doc.get("clients")
    if not isinstance(section, Mapping):
        return ""
    text = ["\n## Real resolvers: glibc and musl `getaddrinfo`\n",
            "`bench/clients/lookup.c`, built at run time against glibc (`gcc`) and statically "
            "against musl (`musl-gcc -static`), calls the C library's own `getaddrinfo` "
            "(AF_UNSPEC: A and AAAA) in a closed loop per thread, with the pod's kubelet "
            "resolv.conf (ndots:5, search list); names as in the scenarios. Percentiles "
            "count failed and unfinished lookups as slowest (`unanswered`); `>= 1 s` includes "
            "the unfinished (still inside `getaddrinfo` when the client stopped "
            f"{section.get('grace_seconds', GRACE):g} s after its window). Conntrack entries: "
            "to the ClusterIP, on the node, after the run (the table is flushed before each "
            "run).\n"]
    for kind, why in sorted((section.get("skipped") or {}).items()):
        text.append(f"- {kind}: skipped, {why}\n")
    if section.get("runs"):
        text.append(markdown_table(HEADER, rows(section), "ll" + "r" * (len(HEADER) - 2)))
    if section.get("dnsperf_skipped"):
        text.append(f"dnsperf: skipped, {section['dnsperf_skipped']}\n")
    if section.get("dnsperf"):
        text.append(
            f"### Capacity: dnsperf at fixed rates\n\nDNS-OARC `dnsperf` from one pod, "
            f"{section.get('dnsperf_clients')} clients (sockets), at most "
            f"{section.get('dnsperf_outstanding')} queries outstanding, "
            f"{section.get('dnsperf_seconds')} s per rate, the scenarios' absolute names "
            f"(A and AAAA); lost: no answer within {section.get('dnsperf_timeout')} s.\n")
        text.append(markdown_table(DNSPERF_HEADER, dnsperf_rows(section),
                                   "rl" + "r" * (len(DNSPERF_HEADER) - 2)))
    return "\n".join(text)


# ------------------------------------------------------------------------------ running


def run_clients(node: PathNode, binary: Path, names: Sequence[str], *, pods: int = PODS,
                threads: int = THREADS, seconds: float = SECONDS,
                grace: float = GRACE) -> list[ClientOutput]:
    """One client per pod, started together; bounded by the client's own exit and, failing
    that, a kill by Popen ``grace + 30`` s after the window."""
    start_at = time.time() + START_LEAD
    procs = [node.lab.popen_in(node.lab.pod_netns[i], [
        str(binary), "--threads", str(threads), "--seconds", f"{seconds:g}",
        "--grace", f"{grace:g}", "--names", ",".join(names), "--start-at", f"{start_at:.6f}",
        "--label", f"pod{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(pods)]
    lines, problems = last_lines(procs, start_at + seconds + grace + 30.0, "client")
    if problems:
        raise LabError("clients failed: " + "; ".join(problems))
    return [ClientOutput.from_json(line) for line in lines]


def _conntrack_to(node: PathNode) -> int:
    text = "".join(node.node(["conntrack", "-L", "-f", fam]).stdout for fam in ("ipv4", "ipv6"))
    return count_to(text, node.server)


def measure(workdir: Path, iptables: str, names: Sequence[str]) -> dict[str, Any]:
    """Build the clients and the two nodes, run every kind on every path (kinds outer, paths
    interleaved), tear down; failures are recorded per run, never raised past a node."""
    binaries, skipped = build(workdir / "bin")
    section: dict[str, Any] = {
        "pods": PODS, "threads": THREADS, "duration_seconds": SECONDS,
        "grace_seconds": GRACE, "iptables_flavour": iptables,
        "paths": [{"name": p.name, "title": p.title, "agent_flags": list(p.agent_flags)}
                  for p in CLIENT_PATHS],
        "skipped": skipped, "runs": [],
    }
    if not binaries:
        return section
    nodes: dict[str, PathNode] = {}
    try:
        for cp in CLIENT_PATHS:
            spec = next(p for p in PATHS if p.name == cp.spec)
            node = PathNode(spec, pods=PODS, services=len(names) // 3, iptables=iptables,
                            workdir=workdir / cp.name)
            nodes[cp.name] = node
            log.info("clients: building %s", cp.name)
            node.start()
            if cp.agent_flags:
                node.stop_agent()
                node.start_agent(cp.agent_flags)
        for kind, binary in binaries.items():
            for name in nodes:
                section["runs"].append(_one(nodes, name, kind, binary, names))
        if shutil.which("dnsperf") is None:
            section["dnsperf_skipped"] = "dnsperf not installed (scripts/install-deps --dev)"
        else:
            data = workdir / "dnsperf.txt"
            data.write_text(dnsperf_data(names))
            section.update(dnsperf_clients=DNSPERF_CLIENTS,
                           dnsperf_outstanding=DNSPERF_OUTSTANDING,
                           dnsperf_seconds=DNSPERF_SECONDS, dnsperf_timeout=DNSPERF_TIMEOUT,
                           dnsperf=[_dnsperf(nodes, name, rate, data)
                                    for rate in DNSPERF_RATES for name in nodes])
    finally:
        for node in nodes.values():
            node.close()
    return section


def _one(nodes: Mapping[str, PathNode], path: str, kind: str, binary: Path,
         names: Sequence[str]) -> dict[str, Any]:
    node = nodes[path]
    log.info("clients: %s on %s", kind, path)
    for other in nodes.values():  # the conntrack hash table is global
        other.flush_conntrack()
    try:
        before = node.snapshot()
        outputs = run_clients(node, binary, names)
        after = node.snapshot()
        entries = _conntrack_to(node)
    except (LabError, OSError, ValueError, subprocess.SubprocessError) as exc:
        log.error("clients: %s on %s failed: %s", kind, path, exc)
        return {"kind": kind, "path": path, "status": "failed", "reason": str(exc)}
    stats = merge(outputs, SECONDS)
    log.info("  %.0f lookups/s, failed %d, >=1s %d, ct to ClusterIP %d", stats.rate,
             stats.failed, stats.ge_1s, entries)
    return {"kind": kind, "path": path, "status": "ok", "stats": stats.to_json(),
            "conntrack_to_cluster_ip": entries,
            "conntrack": counter_deltas(before.conntrack, after.conntrack, CT_COUNTERS),
            "rcvbuf_errors": {k: v - before.rcvbuf.get(k, 0) for k, v in after.rcvbuf.items()}}


def _dnsperf(nodes: Mapping[str, PathNode], path: str, rate: int,
             data: Path) -> dict[str, Any]:
    """One fixed-rate dnsperf run from pod 0 of a path's node; bounded by ``-l`` and the
    timeout, and killed if it overruns both by 30 s."""
    node = nodes[path]
    log.info("dnsperf: %d qps on %s", rate, path)
    for other in nodes.values():
        other.flush_conntrack()
    argv = ["dnsperf", "-s", node.server, "-d", str(data), "-c", str(DNSPERF_CLIENTS),
            "-l", f"{DNSPERF_SECONDS:g}", "-Q", str(rate), "-q", str(DNSPERF_OUTSTANDING),
            "-t", f"{DNSPERF_TIMEOUT:g}"]
    entry: dict[str, Any] = {"path": path, "rate": rate}
    try:
        before = node.snapshot()
        cp = node.lab.pod_run(0, argv, check=False,
                              timeout=DNSPERF_SECONDS + DNSPERF_TIMEOUT + 30)
        after = node.snapshot()
        if cp.returncode != 0:
            raise LabError(f"dnsperf exited {cp.returncode}: {cp.stderr.strip()[-300:]}")
        entry["result"] = parse_dnsperf(cp.stdout)
        entry["conntrack_to_cluster_ip"] = _conntrack_to(node)
        entry["rcvbuf_errors"] = {k: v - before.rcvbuf.get(k, 0)
                                  for k, v in after.rcvbuf.items()}
    except (LabError, OSError, ValueError, subprocess.SubprocessError) as exc:
        log.error("dnsperf on %s failed: %s", path, exc)
        return {**entry, "status": "failed", "reason": str(exc)}
    res = entry["result"]
    log.info("  %.0f qps answered, %d lost", res["qps"], res["lost"])
    return {**entry, "status": "ok"}
