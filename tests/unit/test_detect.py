"""Detection only reads: the legacy tables are saved only when /proc says they exist."""

from __future__ import annotations

from pathlib import Path

from dnsguard.model import Backend, ProxyMode
from dnsguard.node.detect import detect_backend, detect_proxy_mode
from dnsguard.testing.fakes import FakeRunner

KUBE_NAT = "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n"


def _proc(tmp_path: Path, v4: str = "", v6: str = "") -> Path:
    (tmp_path / "net").mkdir()
    (tmp_path / "net/ip_tables_names").write_text(v4)
    (tmp_path / "net/ip6_tables_names").write_text(v6)
    return tmp_path


def _saved(runner: FakeRunner) -> list[tuple[str, ...]]:
    return [argv for argv, _ in runner.calls if "legacy-save" in argv[0]]


def test_no_legacy_table_means_no_legacy_save(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.add(["iptables-legacy-save", "-t", "nat"], KUBE_NAT)  # would be found if asked
    proc = _proc(tmp_path)
    assert detect_proxy_mode(runner, proc) is None
    assert detect_backend(runner, ProxyMode.IPTABLES, proc).value is Backend.IPTABLES_NFT
    assert _saved(runner) == []


def test_legacy_nat_that_exists_is_read(tmp_path: Path) -> None:
    runner = FakeRunner()
    runner.add(["iptables-legacy-save", "-t", "nat"], KUBE_NAT)
    runner.add(["iptables-legacy-save"], KUBE_NAT)
    proc = _proc(tmp_path, v4="filter\nnat\n")
    found = detect_proxy_mode(runner, proc)
    assert found is not None and found.value is ProxyMode.IPTABLES
    assert "iptables-legacy nat" in found.evidence
    assert detect_backend(runner, ProxyMode.IPTABLES, proc).value is Backend.IPTABLES_LEGACY
    # ip6tables-legacy holds no table: not saved
    assert ("ip6tables-legacy-save",) not in _saved(runner)


def test_legacy_filter_only_does_not_save_nat(tmp_path: Path) -> None:
    runner = FakeRunner()
    proc = _proc(tmp_path, v4="filter\n", v6="raw\n")
    detect_proxy_mode(runner, proc)
    detect_backend(runner, ProxyMode.IPTABLES, proc)
    assert _saved(runner) == [("iptables-legacy-save",), ("ip6tables-legacy-save",)]
