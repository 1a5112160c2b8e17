"""Hostile or careless flag values (issue 13, finding 7): each gives one line on stderr naming
the flag and the whole value, exit 2, and no command run (nothing changed)."""

from __future__ import annotations

import ipaddress

import pytest

from dnsguard.cli import build_parser, main
from dnsguard.config import MAX_SECONDS, settings_from
from dnsguard.testing.fakes import FakeRunner

BASE = ["apply", "--proxy-mode", "ipvs", "--backend", "iptables-nft"]
GOOD = {"--dns-ip": "198.18.1.10", "--pod-cidr": "198.18.0.0/16",
        "--mitigation": "nodelocal", "--upstream": "198.18.1.11"}


def run_with(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list]:
    argv = [*BASE]
    for f, v in {**GOOD, flag: value}.items():
        argv += [f, v]
    runner = FakeRunner()
    rc = main(argv, runner)
    return rc, capsys.readouterr().err, runner.calls


@pytest.mark.parametrize(("flag", "value", "why"), [
    ("--upstream", "198.18.1.11:²", "isdigit takes a superscript: a traceback before"),
    ("--health-port", "¹", "isdigit takes a superscript: a traceback before"),
    ("--health-port", "\uff15\uff13", "fullwidth digits"),
    ("--drain-seconds", "1e300", "OverflowError in SIGTERM handling before"),
    ("--sync-interval", "1e308", "a sync never comes"),
    ("--sync-interval", "\uff11\uff10", "float takes fullwidth digits"),
    ("--probe-interval", str(MAX_SECONDS * 2), "over the documented maximum"),
    ("--local-ip", "0.0.0.0", "listens on every node address"),
    ("--local-ip", "::", "listens on every node address"),
    ("--local-ip", "224.0.0.1", "multicast"),
    ("--local-ip", "127.0.0.1", "pods cannot reach the node's loopback"),
    ("--pod-cidr", "0.0.0.0/0", "untracks masqueraded replies"),
    ("--pod-cidr", "::/0", "untracks masqueraded replies"),
    ("--pod-cidr", "fd00:198:18::%eth0/64", "zone ID"),
    ("--dns-ip", "::ffff:198.18.1.10", "v4-mapped"),
    ("--dns-ip", "fe80::1%eth0", "zone ID"),
    ("--dns-ip", "0.0.0.0", "unspecified"),
    ("--upstream", "fd00::1%\npython-script: x", "the issue's unbound.conf injection"),
    ("--upstream", "[fd00::1%eth0]:53", "zone ID"),
    ("--upstream", "0.0.0.0", "unspecified"),
    ("--cluster-domain", "clustér.local", "non-ASCII"),
    ("--cluster-domain", "a_b.local", "not a hostname label"),
    ("--metrics-address", "[fe80::1%eth0]:9253", "zone ID"),
    ("--external-cidr", "0.0.0.0/0", "every address: no limit at all"),
    ("--external-cidr", "198.19.5.1/24", "host bits set"),
])
def test_bad_value_exits_2_naming_flag_and_value(flag: str, value: str, why: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    rc, err, calls = run_with(flag, value, capsys)
    assert rc == 2, why
    assert err.count("\n") == 1 and err.startswith("dnsguard: error: "), err
    assert flag in err and repr(value) in err, err
    assert calls == []  # nothing looked at, nothing changed


def test_a_port_error_quotes_the_whole_value(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``invalid --upstream '0'``, not the value the user typed."""
    rc, err, _ = run_with("--upstream", "10.0.0.1:0", capsys)
    assert rc == 2 and "invalid --upstream '10.0.0.1:0'" in err


def test_a_missing_kubeconfig_exits_2_before_anything_changes(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Before: exit 1, as if the API had failed, not the flag."""
    runner = FakeRunner()
    rc = main(["apply", "--proxy-mode", "ipvs", "--backend", "iptables-nft", "--dns-ip",
               "198.18.1.10", "--pod-cidr", "198.18.0.0/16", "--kubeconfig", "/nonexistent"],
              runner)
    err = capsys.readouterr().err
    assert rc == 2 and "--kubeconfig '/nonexistent'" in err and err.count("\n") == 1
    assert runner.calls == []


@pytest.mark.parametrize(("flag", "value"), [
    ("--upstream", "127.0.0.1:5353"), ("--upstream", "[fd00:198:18::1]:53"),
    ("--local-ip", "169.254.20.10"), ("--sync-interval", "0.5"), ("--drain-seconds", "0"),
    ("--cluster-domain", "Cluster.Local."), ("--health-port", "053053"[1:]),
])
def test_good_values_still_pass(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err, _ = run_with(flag, value, capsys)
    assert "invalid" not in err, err


def test_an_unusable_kubeconfig_file_exits_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "kubeconfig"
    bad.write_text("not: [a, kubeconfig\n")
    runner = FakeRunner()
    rc = main(["apply", "--proxy-mode", "ipvs", "--backend", "iptables-nft", "--dns-ip",
               "198.18.1.10", "--pod-cidr", "198.18.0.0/16", "--kubeconfig", str(bad)], runner)
    err = capsys.readouterr().err
    assert rc == 2 and f"--kubeconfig {bad}" in err.splitlines()[-1]
    assert not any("restore" in argv[0] or "-f" in argv for argv, _ in runner.calls)


def test_external_cidr_is_repeatable_and_typed() -> None:
    ns = build_parser().parse_args(["plan", "--external-cidr", "198.19.5.0/24",
                                    "--external-cidr", "fd00:198:18:5::/64"])
    assert settings_from(ns, {}).external_cidrs == (ipaddress.ip_network("198.19.5.0/24"),
                                                    ipaddress.ip_network("fd00:198:18:5::/64"))
