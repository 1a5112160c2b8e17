"""What the benchmark runs: paths, scenarios and the two profiles (full and ``--quick``).

Plain frozen values, no I/O, so the whole plan of a run can be printed (``--list``) and tested.

Paths are the ways a pod's lookup can reach a DNS server on one node; every path gets the same
load. Scenarios are loads plus conditions (a lowered conntrack table, a cache killed mid-run).
A scenario lists the paths it applies to: restarting dnsguard's cache only exists on the
node-local paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dnsguard.model import ProxyMode

__all__ = [
    "BASELINE",
    "NODELOCAL_PATHS",
    "PATHS",
    "REFERENCE",
    "Load",
    "PathSpec",
    "Profile",
    "Scenario",
    "lookup_names",
    "profile",
]

Event = Literal["none", "kill-cache", "restart-agent"]


@dataclass(frozen=True)
class PathSpec:
    name: str
    title: str
    proxy_mode: ProxyMode
    nodelocal: bool = False
    #: the cache alone on a node without any netfilter rule: the machine's ceiling
    reference: bool = False


PATHS: tuple[PathSpec, ...] = (
    PathSpec("iptables", "kube-proxy iptables, ClusterIP", ProxyMode.IPTABLES),
    PathSpec("nftables", "kube-proxy nftables, ClusterIP", ProxyMode.NFTABLES),
    PathSpec("nodelocal-iptables", "dnsguard node-local, iptables mode", ProxyMode.IPTABLES,
             nodelocal=True),
    PathSpec("nodelocal-nftables", "dnsguard node-local, nftables mode", ProxyMode.NFTABLES,
             nodelocal=True),
    PathSpec("reference", "same unbound, no netfilter rules", ProxyMode.NFTABLES,
             reference=True),
)
BASELINE = "iptables"
REFERENCE = "reference"
NODELOCAL_PATHS = tuple(p.name for p in PATHS if p.nodelocal)


@dataclass(frozen=True)
class Load:
    """Closed-loop load: ``concurrency`` lookups in flight in each of ``pods`` pods."""

    pods: int
    concurrency: int
    duration: float
    #: per pod; a bound on top of the duration (the probe stops at whichever comes first)
    count: int = 2_000_000


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    load: Load
    #: lower the (global) conntrack limits for the run; None keeps the current value
    conntrack_max: int | None = None
    #: "default": leave the bucket count as the machine has it; "quarter": max/4 (kube-proxy)
    buckets: Literal["default", "quarter"] = "default"
    event: Event = "none"
    #: seconds into the run when the event happens
    event_at: float = 3.0
    #: runs per path, round-robin over the paths and merged: averages the machine's noise
    #: out of the ratios that targets are judged on
    rounds: int = 1
    paths: tuple[str, ...] = field(default_factory=lambda: tuple(p.name for p in PATHS))

    @property
    def needs_sysctl(self) -> bool:
        return self.conntrack_max is not None

    def bucket_count(self, default: int) -> int | None:
        """The bucket count to set, given the machine's current one; None: leave it."""
        if self.conntrack_max is None:
            return None
        if self.buckets == "quarter":
            return max(self.conntrack_max // 4, 1024)
        return default


@dataclass(frozen=True)
class Profile:
    name: str
    scenarios: tuple[Scenario, ...]
    #: lookups per path for the conntrack-entries calibration (few enough that source ports
    #: almost never repeat, so each socket's entry is new)
    calibration_lookups: int
    ceiling: Load
    rule_counts: tuple[int, ...]
    #: per backend and size, the most seconds spent on one-exec-per-rule before extrapolating
    per_rule_cap: float
    footprint_seconds: float
    footprint_paths: tuple[str, ...]
    #: lookups per pod and phase in the IPVS VM (software emulation: counts, not rates); 0
    #: leaves the VM out (it alone takes 2-4 minutes)
    vm_lookups: int
    vm_concurrency: int
    #: --external-to-cluster scale (`bench.external`): Services with external IPs
    external_services: int
    #: most Services per kakao-style sample, and seconds before a sample stops early
    external_sample: int
    external_sample_seconds: float
    #: seconds the agent is sampled once its first full sync is done
    external_settle: float


def _pressure(load: Load, limit: int, buckets: Literal["default", "quarter"]) -> Scenario:
    label = "buckets at default" if buckets == "default" else "buckets max/4"
    return Scenario(f"pressure-{limit // 1024}k-{buckets}",
                    f"nf_conntrack_max {limit}, {label}", load, conntrack_max=limit,
                    buckets=buckets)


def profile(quick: bool) -> Profile:
    """The full run (~20 min on a 2-core machine) or a smoke test (~4 min, without the VM)."""
    d = 3.0 if quick else 10.0
    steady = Load(pods=4, concurrency=4, duration=d)
    burst = Load(pods=4, concurrency=32, duration=d)
    restart = Load(pods=4, concurrency=4, duration=8.0 if quick else 15.0)
    scenarios = [
        Scenario("steady", "steady: 4 pods x 4 in flight", steady, rounds=1 if quick else 3),
        Scenario("burst", "burst: 4 pods x 32 in flight", burst),
    ]
    pressure = [(4096, "quarter")] if quick else [
        (16384, "default"), (16384, "quarter"), (4096, "default"), (4096, "quarter")]
    scenarios += [_pressure(steady, n, b) for n, b in pressure]  # type: ignore[arg-type]
    scenarios += [
        Scenario("kill-cache", "kill -9 of the cache under load", restart,
                 event="kill-cache", paths=NODELOCAL_PATHS),
        Scenario("restart-agent", "agent SIGTERM + start under load", restart,
                 event="restart-agent", paths=NODELOCAL_PATHS),
    ]
    return Profile(
        name="quick" if quick else "full",
        scenarios=tuple(scenarios),
        calibration_lookups=300,
        ceiling=Load(pods=1, concurrency=64, duration=d),
        rule_counts=(10, 100, 1000) if quick else (10, 100, 1000, 10000),
        per_rule_cap=10.0 if quick else 60.0,
        footprint_seconds=5.0 if quick else 15.0,
        footprint_paths=NODELOCAL_PATHS[:1] if quick else NODELOCAL_PATHS,
        vm_lookups=0 if quick else 400,
        vm_concurrency=4,
        external_services=1000 if quick else 10_000,
        external_sample=50,
        external_sample_seconds=3.0 if quick else 8.0,
        external_settle=3.0,
    )


def lookup_names(services: int) -> tuple[str, ...]:
    """Round-robin name mix: one third each of short names (first search domain answers),
    namespace-qualified names (one NXDOMAIN step through the search list first) and absolute
    FQDNs (no search), so 4 lookup steps -- 4 sockets, 8 queries -- per 3 lookups."""
    names: list[str] = []
    for i in range(services):
        names += [f"svc-{i}", f"svc-{i}.default", f"svc-{i}.default.svc.cluster.local."]
    return tuple(names)
