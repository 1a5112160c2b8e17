"""The qemu VM harness (dnsguard.testing.vm): pure helpers, then a few real boots.

Boots are slow (~5 s each under TCG, plus whatever the script does), so one boot runs a script
that checks many things and reports each through $DNSGUARD_VM_OUT; the tests below read those
reports. Two more boots check a non-zero exit code and the timeout path.

Boot tests are marked ``vm``; they skip when ``vm.available()`` gives a reason, unless
DNSGUARD_VM_REQUIRED=1 (CI on a machine that must run them), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import dnsguard
from dnsguard.testing import vm

REPO = Path(dnsguard.__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# pure helpers (no boot)


def test_natural_key_orders_abi_numbers():
    names = [
        "linux-image-6.1.0-9-amd64",
        "linux-image-6.1.0-56-amd64",
        "linux-image-6.1.0-10-amd64",
    ]
    assert max(names, key=vm._natural_key) == "linux-image-6.1.0-56-amd64"


def test_env_script_quotes_values_and_rejects_bad_names():
    text = vm._env_script({"A": "x y'z$HOME", "B_2": ""})
    out = subprocess.run(
        ["bash", "-c", text + 'printf "%s|%s" "$A" "$B_2"'],
        capture_output=True,
        text=True,
        check=True,
        env={},
    ).stdout
    assert out == "x y'z$HOME|"
    with pytest.raises(ValueError):
        vm._env_script({"A B": "x"})


def test_cpio_is_readable_by_cpio(tmp_path):
    if not shutil.which("cpio"):
        pytest.skip("cpio not installed")
    c = vm._Cpio()
    c.dir("bin")
    c.file("bin/hello", b"hi\n", 0o755)
    c.symlink("bin/sh", "hello")
    c.chardev("console", 5, 1)
    archive = tmp_path / "a.cpio"
    archive.write_bytes(c.finish())
    with archive.open("rb") as f:
        listing = subprocess.run(
            ["cpio", "-itv", "--quiet"], stdin=f, capture_output=True, text=True, check=True
        ).stdout
    assert "bin/hello" in listing
    assert "bin/sh -> hello" in listing
    assert listing.splitlines()[-1].startswith("crw")


def test_boot_module_order_puts_dependencies_first(tmp_path):
    (tmp_path / "modules.dep").write_text(
        "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/fs/overlayfs/overlay.ko:\n"
    )
    order = [Path(p).name for p in vm._boot_module_order(tmp_path)]
    assert len(order) == len(set(order)) == 7
    for mod, dep in [("9p.ko", "9pnet.ko"), ("9p.ko", "netfs.ko"), ("virtio_pci.ko", "virtio.ko")]:
        assert order.index(dep) < order.index(mod)


def test_lockup_watch_fires_a_grace_period_after_the_report(tmp_path):
    console = tmp_path / "console.log"
    console.write_bytes(b"[ 1.0] boot\n[ 30.1] watchdog: BUG: soft lo")
    watch = vm._LockupWatch(console)
    assert not watch.expired(100.0)
    with console.open("ab") as f:  # the marker arrives split across two reads
        f.write(b"ckup - CPU#1 stuck for 22s! [getent:812]\n")
    assert not watch.expired(101.0)  # seen now: the grace starts here
    assert not watch.expired(101.0 + vm.LOCKUP_GRACE - 1)
    assert watch.expired(101.0 + vm.LOCKUP_GRACE)


def test_lockup_watch_ignores_a_console_without_one(tmp_path):
    console = tmp_path / "console.log"
    console.write_text("[ 1.0] boot\n[ 2.0] hung_task: blocked for more than 120 seconds\n")
    watch = vm._LockupWatch(console)
    assert not watch.expired(0.0) and not watch.expired(10_000.0)
    assert not vm._LockupWatch(tmp_path / "missing.log").expired(10_000.0)


def test_lockup_excerpt_starts_at_the_report():
    lines = [f"[ {i}.0] noise {i}" for i in range(200)]
    lines[150] = "[ 150.0] watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [getent:9]"
    lines[151] = "[ 150.0] Call Trace:"
    excerpt = vm._lockup_excerpt("\n".join(lines))
    assert excerpt.splitlines()[0] == lines[150] and "Call Trace" in excerpt
    assert vm._lockup_excerpt("a\nb\nc", lines=2) == "b\nc"


def test_static_busybox_detection():
    assert not vm._is_static_elf(Path(sys.executable).resolve())  # dynamically linked
    assert not vm._is_static_elf(Path(__file__))


def test_cwd_the_guest_hides_is_refused():
    with pytest.raises(ValueError, match="mounts anew"):
        vm.run("true", cwd="/run")


# ---------------------------------------------------------------------------------------------
# boots


@pytest.fixture(scope="module")
def kernel() -> vm.Kernel:
    reason = vm.available()
    if reason is not None:
        if os.environ.get("DNSGUARD_VM_REQUIRED") == "1":
            pytest.fail(f"VM harness required but unavailable: {reason}")
        pytest.skip(reason)
    return vm.prepare()


CHECKS = r"""
out=$DNSGUARD_VM_OUT
check() {  # check NAME CMD...: record CMD's exit code and output under $out
    local name=$1; shift
    "$@" > "$out/$name.log" 2>&1
    echo $? > "$out/$name.rc"
}
timed() {  # timed NAME CMD...: like check, plus wall milliseconds in NAME.ms
    local name=$1 t0; shift
    t0=$(date +%s%N)
    check "$name" "$@"
    echo $(( ($(date +%s%N) - t0) / 1000000 )) > "$out/$name.ms"
}
check modprobe bash -c 'modprobe ip_vs && modprobe ip_vs_rr && modprobe dummy'
check modprobe_netfilter bash -c '
    for m in nf_conntrack iptable_raw iptable_nat nf_tables nft_ct nft_nat xt_CT xt_conntrack; do
        modprobe "$m" || { echo "modprobe $m failed"; exit 1; }
    done'
check netns_dummy bash -c 'ip netns add x && ip -n x link add kube-ipvs0 type dummy \
    && ip -n x link show kube-ipvs0'
check ipvsadm bash -c 'ip netns exec x ipvsadm -A -u 198.18.1.10:53 -s rr \
    && ip netns exec x ipvsadm -Ln'
check iptables_notrack bash -c '
    ip netns exec x iptables -t raw -A PREROUTING -p udp --dport 53 -j CT --notrack \
    && ip netns exec x iptables -t raw -S PREROUTING'
check tmp_overlay bash -c 'test -f "$HOST_TMP_MARKER" && echo guest > "/tmp/$TOKEN-guest" \
    && test -f "/tmp/$TOKEN-guest"'
check run_is_tmpfs bash -c '[ "$(stat -f -c %T /run)" = tmpfs ]'
check pwd pwd
check env bash -c 'printf "%s" "$DNSGUARD_VM_TEST_VALUE"'
check write_etc bash -c "echo guest > /etc/$TOKEN && [ \"\$(cat /etc/$TOKEN)\" = guest ]"
check write_cwd bash -c "echo guest > ./$TOKEN && [ \"\$(cat ./$TOKEN)\" = guest ]"
timed import_dnsguard "$HOST_PYTHON" -c 'import dnsguard; print(dnsguard.__file__)'
timed pytest_version "$HOST_PYTHON" -m pytest --version
exit 0
"""

EXPECTED_CHECKS = [
    "modprobe",
    "modprobe_netfilter",
    "netns_dummy",
    "ipvsadm",
    "iptables_notrack",
    "tmp_overlay",
    "run_is_tmpfs",
    "pwd",
    "env",
    "write_etc",
    "write_cwd",
    "import_dnsguard",
    "pytest_version",
]


class Checks:
    def __init__(self, result: vm.VMResult, out: Path, token: str) -> None:
        self.result = result
        self.out = out
        self.token = token

    def rc(self, name: str) -> int:
        path = self.out / f"{name}.rc"
        assert path.exists(), f"check {name} never ran; script output:\n{self.result.output}"
        return int(path.read_text())

    def log(self, name: str) -> str:
        return (self.out / f"{name}.log").read_text()

    def ok(self, name: str) -> str:
        rc = self.rc(name)
        assert rc == 0, f"check {name} exited {rc}:\n{self.log(name)}"
        return self.log(name)


@pytest.fixture(scope="module")
def checks(kernel, tmp_path_factory) -> Checks:
    out = tmp_path_factory.mktemp("vm-out")
    token = f"dnsguard-vm-test-{uuid.uuid4().hex}"
    marker = Path(tempfile.mkstemp(prefix="dnsguard-vm-marker-", dir="/tmp")[1])
    result = vm.run(
        CHECKS,
        timeout=300,
        kernel=kernel,
        cwd=REPO,
        out_dir=out,
        env={
            "TOKEN": token,
            "HOST_PYTHON": sys.executable,
            "DNSGUARD_VM_TEST_VALUE": "a b'c$HOME",
            "HOST_TMP_MARKER": str(marker),
        },
    )
    marker.unlink()
    return Checks(result, out, token)


@pytest.mark.vm
def test_exit_code_zero_and_every_check_reported(checks):
    assert checks.result.returncode == 0, checks.result.output
    missing = [n for n in EXPECTED_CHECKS if not (checks.out / f"{n}.rc").exists()]
    assert not missing, f"checks with no report: {missing}\n{checks.result.output}"


@pytest.mark.vm
def test_modprobe_ipvs_dummy_and_netfilter(checks):
    checks.ok("modprobe")
    checks.ok("modprobe_netfilter")


@pytest.mark.vm
def test_dummy_link_in_a_netns(checks):
    assert "kube-ipvs0" in checks.ok("netns_dummy")


@pytest.mark.vm
def test_ipvsadm_in_a_netns(checks):
    assert "198.18.1.10:53 rr" in checks.ok("ipvsadm")


@pytest.mark.vm
def test_iptables_notrack_in_a_netns(checks):
    assert "--notrack" in checks.ok("iptables_notrack")


@pytest.mark.vm
def test_guest_mounts(checks):
    checks.ok("tmp_overlay")  # the host's /tmp is visible (a CI clone may live there)...
    assert not Path(f"/tmp/{checks.token}-guest").exists()  # ...and guest writes stay there
    checks.ok("run_is_tmpfs")


@pytest.mark.vm
def test_cwd_and_env_pass_through(checks):
    assert checks.ok("pwd").strip() == str(REPO)
    assert checks.ok("env") == "a b'c$HOME"


@pytest.mark.vm
def test_host_python_imports_dnsguard(checks):
    assert checks.ok("import_dnsguard").strip() == dnsguard.__file__
    assert checks.ok("pytest_version").startswith("pytest ")


@pytest.mark.vm
def test_guest_writes_do_not_reach_the_host(checks):
    checks.ok("write_etc")  # the guest could write them...
    checks.ok("write_cwd")
    assert not (Path("/etc") / checks.token).exists()  # ...and the host didn't get them
    assert not (REPO / checks.token).exists()


@pytest.mark.vm
def test_nonzero_exit_code_and_output(kernel):
    res = vm.run("echo to-stdout; echo to-stderr >&2; exit 7", timeout=120, kernel=kernel)
    assert res.returncode == 7
    assert "to-stdout" in res.output
    assert "to-stderr" in res.output
    assert "Linux version" not in res.output  # the kernel's log is kept apart
    assert "Linux version" in res.dmesg
    assert res.duration > 0


@pytest.mark.vm
def test_timeout_kills_qemu(kernel):
    start = time.monotonic()
    with pytest.raises(vm.VMTimeoutError) as info:
        vm.run("echo started; sleep 600", timeout=10, kernel=kernel)
    assert time.monotonic() - start < 60
    assert "still running after 10s" in str(info.value)
    assert not Path(f"/proc/{info.value.pid}").exists() or "qemu" not in Path(
        f"/proc/{info.value.pid}/cmdline"
    ).read_text(errors="replace")
