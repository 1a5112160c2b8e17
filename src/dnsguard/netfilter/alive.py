"""The dead man's switch: kernel state that keeps interception on only while refreshed.

iptables backends: the NOTRACK rules carry ``-m recent --rcheck --seconds N --rdest`` on the
lists ``dnsguard-alive4``/``-alive6``; writing ``+ADDR`` to ``/proc/net/xt_recent/<list>``
refreshes an address. nftables: elements with a timeout in the sets ``alive4``/``alive6`` of
table ``inet dnsguard``, re-added on each refresh. Either way, when refreshes stop (the cache
fails its health check, the agent is OOM-killed) the entries age out and the rules stop matching
within `ALIVE_SECONDS`: no process is needed for DNS to fall back to kube-proxy's path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dnsguard.model import ALIVE_SECONDS, NFT_TABLE, Backend, Family, IPAddress
from dnsguard.netfilter.errors import NetfilterError, restore_error
from dnsguard.netfilter.runner import Runner

__all__ = ["AliveSwitch"]


class AliveSwitch:
    def __init__(self, runner: Runner, backend: Backend,
                 proc_root: Path = Path("/proc")) -> None:
        self.runner = runner
        self.backend = backend
        self.proc_root = proc_root

    def _by_family(self, addrs: Iterable[IPAddress]) -> dict[Family, list[str]]:
        out: dict[Family, list[str]] = {}
        for a in addrs:
            out.setdefault(Family.of(a), []).append(str(a))
        return out

    def refresh(self, addrs: Iterable[IPAddress]) -> None:
        """Keep interception on for ``addrs`` for another `ALIVE_SECONDS`."""
        groups = self._by_family(addrs)
        if self.backend is Backend.NFTABLES:
            lines = []
            for fam, ips in groups.items():
                elems = ", ".join(ips)
                s = f"inet {NFT_TABLE} alive{fam.value}"
                # add-delete-add: always succeeds and always restarts the timeout
                timed = ", ".join(f"{ip} timeout {ALIVE_SECONDS}s" for ip in ips)
                lines += [f"add element {s} {{ {elems} }}", f"delete element {s} {{ {elems} }}",
                          f"add element {s} {{ {timed} }}"]
            self._nft("\n".join(lines) + "\n")
            return
        for fam, ips in groups.items():
            self._recent(fam, "".join(f"+{ip}\n" for ip in ips))

    def withdraw(self, addrs: Iterable[IPAddress] | None = None) -> None:
        """Turn interception off now for ``addrs`` (None: every address, graceful hand-over)."""
        if addrs is not None:
            self._withdraw_some(self._by_family(addrs))
            return
        if self.backend is Backend.NFTABLES:
            for fam in Family:  # one transaction each: a family may have no set
                self._nft(f"flush set inet {NFT_TABLE} alive{fam.value}\n", missing_ok=True)
            return
        for fam in Family:
            self._recent(fam, "/\n", missing_ok=True)

    def _withdraw_some(self, groups: dict[Family, list[str]]) -> None:
        if self.backend is Backend.NFTABLES:
            lines = []
            for fam, ips in groups.items():
                elems = ", ".join(ips)
                s = f"inet {NFT_TABLE} alive{fam.value}"
                # add-delete: succeeds whether or not the element was there
                lines += [f"add element {s} {{ {elems} }}", f"delete element {s} {{ {elems} }}"]
            if lines:
                self._nft("\n".join(lines) + "\n", missing_ok=True)
            return
        first: NetfilterError | None = None
        for fam, ips in groups.items():
            for ip in ips:  # one failed address must not keep the others in
                try:
                    self._recent(fam, f"-{ip}\n", missing_ok=True)
                except NetfilterError as exc:
                    first = first or exc
        if first is not None:
            raise first

    def _recent(self, fam: Family, text: str, missing_ok: bool = False) -> None:
        path = self.proc_root / "net/xt_recent" / fam.alive_name
        try:
            # one write() per command: xt_recent parses a single command per write
            for cmd in text.splitlines():
                path.write_text(cmd + "\n")
        except FileNotFoundError:
            if not missing_ok:
                raise NetfilterError(
                    f"{path} is missing: dnsguard's rules are not installed") from None
        except OSError as exc:
            raise NetfilterError(f"cannot write {path}: {exc}") from None

    def _nft(self, text: str, missing_ok: bool = False) -> None:
        res = self.runner.run(["nft", "-f", "-"], stdin=text)
        if not res.ok and not (missing_ok and "No such file or directory" in res.stderr):
            raise restore_error("nft -f", res.stderr, text)
