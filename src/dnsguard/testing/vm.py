"""Run a bash script inside Debian's stock kernel under qemu, seeing the host's filesystem.

Why
---
Some integration tests need kernel features this machine's kernel lacks: it has no loadable
modules at all, so no IPVS (``ip_vs``) and no ``dummy`` links, which kube-proxy's IPVS mode uses
(``kube-ipvs0``). Debian's stock kernel (the package ``linux-image-amd64`` depends on) has all of
them as modules. This module boots that kernel under qemu, runs a script as root inside it and
hands back the script's exit code and output. The guest sees the host's own files and tools
(ipvsadm, iptables, nft, conntrack, dnsmasq, the host's Python and virtualenv), so nothing has to
be installed twice and the code under test is the code in the work tree.

Design
------
* Kernel: ``apt-get download`` the package and ``dpkg-deb -x`` it into a cache directory
  (``$DNSGUARD_VM_CACHE``, else ``/var/cache/dnsguard/vm``). It is never installed on the host.
  The package ships no depmod data, so ``depmod -b`` generates it in the cache. Modules this
  harness can't use (sound, GPUs, NICs, wireless, ...) are pruned, keeping every dependency of
  what stays: modules shrink from ~400 MB to ~100 MB, ~180 MB per kernel in all.
* Boot: qemu TCG (/dev/kvm is absent or, on this machine, opens but hangs the guest), booting
  the *uncompressed* ELF ``vmlinux`` through its PVH entry point with the qboot firmware: the
  bzImage's own XZ decompression plus SeaBIOS took ~7 s under TCG, PVH + qboot take ~0.4 s.
  ``vmlinux`` is extracted from the bzImage once, at prepare time. The kernel command line
  skips what costs time and isn't needed (crypto self-tests, mitigations, KASLR).
* Initramfs: built in Python (cpio "newc", uncompressed), holding a static busybox, the few
  modules needed to reach the 9p shares (virtio-pci, 9p, overlay and their dependencies, in
  load order) and ``vm_init.sh`` as ``/init``. Its file name carries a hash of its content, so a
  change to the init script or to the module set rebuilds it.
* Filesystem: three virtio-9p shares. ``hostroot`` is the host's ``/``, read-only, under a tmpfs
  overlay: the guest can write /etc, /var, the work tree... and nothing reaches the host.
  The guest caches it (9p ``cache=loose``): host files changed during a run may look stale.
  ``modules`` is the extracted ``lib/modules/<version>``, mounted at ``/lib/modules/<version>``
  so ``modprobe`` (the host's kmod) works. ``job`` is a host temp dir, read-write: the script,
  its environment and cwd go in, its exit code, output, dmesg and ``$DNSGUARD_VM_OUT`` come out.
  The guest has fresh /proc, /sys, /dev (devtmpfs, pts, shm) and /run (tmpfs); /tmp is the
  host's, read-only under the overlay (a checkout there is visible, writes stay in RAM); and
  cgroup2; ``/var/run/netns`` works for ``ip netns add``. There is no network device
  (``-nic none``): nothing the guest does touches the host's network.
* Exit code: the init script (PID 1 in the guest) is the parent of the script's bash and writes
  its exit status into the job share before ``poweroff -f``; ``run`` returns that, never
  qemu's. No status file means the guest never got that far: ``VMError`` with the console log.
* Environment: the script starts from an empty environment plus what ``run`` passes: the host's
  PASSTHROUGH_ENV (PATH, HOME, LANG, PYTHONPATH, VIRTUAL_ENV, ..., when set), then the caller's
  ``env``, plus ``DNSGUARD_VM=1`` and ``DNSGUARD_VM_OUT`` (a directory copied to ``out_dir``).
* Files only reach the host through ``$DNSGUARD_VM_OUT`` (and the job share): everything else the
  guest writes lives in the guest's RAM and is gone at power-off. /tmp and /run are the guest's
  own, so the script's cwd can't be under them.

Use ``available()`` to skip tests when the harness can't run, ``prepare()`` once (idempotent,
also ``python -m dnsguard.testing.vm prepare`` or ``scripts/vm-prepare``) and ``run()`` per
boot. Costs under TCG on this 2-core machine: ~3.5 s from qemu start to power-off for a
trivial script (5-6 s when the machine is busy); the host's Python runs ~15-20x slower than
natively (``import dnsguard`` ~2 s cold, ``pytest --version`` ~5 s), so put many checks in
one boot.

Knobs (environment): DNSGUARD_VM_CACHE (cache dir), DNSGUARD_VM_KERNEL_PACKAGE (pin the
package), DNSGUARD_VM_ACCEL (e.g. ``kvm`` where it works), DNSGUARD_VM_CPU, DNSGUARD_VM_CMDLINE
(extra kernel parameters, e.g. ``loglevel=7`` to debug a boot), DNSGUARD_VM_BUSYBOX.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

__all__ = [
    "Kernel",
    "VMError",
    "VMResult",
    "VMTimeoutError",
    "available",
    "default_cache_dir",
    "prepare",
    "run",
]

META_PACKAGE = "linux-image-amd64"
DEFAULT_CACHE = Path("/var/cache/dnsguard/vm")
QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")
APT_LISTS = Path("/var/lib/apt/lists")
INIT_SCRIPT = Path(__file__).with_name("vm_init.sh")

# Guest paths (must match vm_init.sh).
GUEST_JOB = "/run/dnsguard-vm/job"
GUEST_OUT = f"{GUEST_JOB}/out"

# Modules /init insmods to reach its filesystems (dependencies are added from modules.dep).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")

# What of lib/modules/<ver>/kernel the cache keeps (plus anything those depend on).
KEEP_MODULE_DIRS = (
    "arch",
    "block",
    "crypto",
    "fs",
    "lib",
    "mm",
    "net",
    "virt",
    "drivers/block",
    "drivers/char",
    "drivers/md",
    "drivers/net",
    "drivers/virtio",
)
DROP_MODULE_DIRS = (
    "drivers/net/can",
    "drivers/net/ethernet",
    "drivers/net/ieee802154",
    "drivers/net/usb",
    "drivers/net/wireless",
    "drivers/net/wwan",
    "net/bluetooth",
    "net/mac80211",
    "net/wireless",
)

# Host variables passed to the guest script unless the caller overrides them.
PASSTHROUGH_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONUNBUFFERED",
)

# Host paths the guest mounts its own filesystems over: a cwd below them wouldn't exist there.
GUEST_MASKED = ("/proc", "/sys", "/dev", "/run", "/var/run")

KERNEL_CMDLINE = (
    "console=ttyS0",
    "rdinit=/init",
    "panic=-1",
    # 5, not 4: stack traces print at the default message level (4), so at 4 a soft lockup
    # or hung-task report reached the console as one line, without its stack.
    "loglevel=5",
    "softlockup_all_cpu_backtrace=1",
    "mitigations=off",
    "nokaslr",
    "8250.nr_uarts=1",
    "i8042.noaux",
    "i8042.nokbd",
    "random.trust_cpu=on",
    "cryptomgr.notests",
)

_CMD_TIMEOUT = 300.0

# A guest kernel that reports a soft lockup is given this long to print its stacks (and to
# recover, which a real lockup does not), then the run ends with VMError instead of its timeout.
LOCKUP_MARKER = "BUG: soft lockup"
LOCKUP_GRACE = 60.0


class VMError(RuntimeError):
    """The harness couldn't prepare, boot, or get a result out of the guest.

    ``output`` and ``console`` hold what the script and the serial console printed, if it got
    that far (the message has their tails).
    """

    def __init__(self, message: str, *, output: str = "", console: str = "") -> None:
        super().__init__(message)
        self.output = output
        self.console = console


class VMTimeoutError(VMError):
    """The guest didn't power off in time; qemu (only that process, ``pid``) was killed."""

    def __init__(self, message: str, *, pid: int, output: str, console: str) -> None:
        super().__init__(message, output=output, console=console)
        self.pid = pid


@dataclass(frozen=True)
class Kernel:
    """A prepared kernel: everything ``run`` boots, all inside the cache directory."""

    version: str  # uname -r, e.g. 6.1.0-56-amd64
    package: str  # e.g. linux-image-6.1.0-56-amd64
    package_version: str  # e.g. 6.1.192-2
    vmlinuz: Path  # the package's bzImage, as shipped
    image: Path  # uncompressed ELF vmlinux, booted through PVH
    modules_dir: Path  # .../lib/modules/<version>, with depmod data
    initramfs: Path  # cpio (newc, uncompressed)


@dataclass(frozen=True)
class VMResult:
    """What a guest run produced."""

    returncode: int  # the script's exit code (not qemu's)
    output: str  # the script's stdout and stderr, interleaved
    duration: float  # seconds, qemu start to exit
    console: str = ""  # the serial console: kernel messages, init's, the script's output
    dmesg: str = ""  # the guest kernel's log, read after the script ended


def default_cache_dir() -> Path:
    env = os.environ.get("DNSGUARD_VM_CACHE")
    return Path(env) if env else DEFAULT_CACHE


# ---------------------------------------------------------------------------------------------
# availability


def _is_static_elf(path: Path) -> bool:
    """True if ``path`` is an x86-64 ELF with no program interpreter (statically linked)."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # ELFCLASS64
                return False
            phoff = int.from_bytes(head[32:40], "little")
            phentsize = int.from_bytes(head[54:56], "little")
            phnum = int.from_bytes(head[56:58], "little")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    pt_interp = 3
    return all(
        int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") != pt_interp
        for i in range(phnum)
    )


def _find_busybox() -> Path | None:
    candidates = [os.environ.get("DNSGUARD_VM_BUSYBOX", ""), "/bin/busybox", "/usr/bin/busybox"]
    found = shutil.which("busybox")
    if found:
        candidates.append(found)
    for c in candidates:
        if c and _is_static_elf(Path(c)):
            return Path(c)
    return None


def _cached_kernels(cache: Path) -> list[Kernel]:
    kernels = []
    for meta in sorted(cache.glob("*/kernel.json")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            kernels.append(_kernel_from_meta(meta.parent))
    return kernels


def available(cache_dir: Path | None = None) -> str | None:
    """None if ``run`` can work here, else a one-line reason (for ``pytest.skip``).

    Cheap: downloads nothing. A kernel counts as available if one is cached or if apt can
    resolve the package to download.
    """
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return f"the VM harness needs x86-64 Linux, not {sys.platform}/{os.uname().machine}"
    if os.geteuid() != 0:
        return "the VM harness needs root (9p passthrough of / and apt-get download)"
    if not shutil.which(QEMU):
        return f"{QEMU} not found (apt-get install qemu-system-x86)"
    if _find_busybox() is None:
        return "no statically linked busybox (apt-get install busybox-static)"
    if not Path("/bin/bash").exists():
        return "no /bin/bash for the guest to run scripts with"
    cache = cache_dir or default_cache_dir()
    if any(k.image.exists() for k in _cached_kernels(cache)):
        return None
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "depmod"):
        if not shutil.which(tool):
            return f"{tool} not found: can't fetch the kernel package"
    try:
        _resolve_package()
    except VMError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------
# prepare


def _run_cmd(
    argv: Sequence[str], *, cwd: Path | None = None, timeout: float = _CMD_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise VMError(f"{shlex.join(argv)} timed out after {timeout:.0f}s") from e
    except FileNotFoundError as e:
        raise VMError(f"{argv[0]} not found") from e


def _apt_lists_key() -> str:
    """Changes whenever apt's package lists do (apt-get update rewrites the changed ones)."""
    h = hashlib.sha256()
    with contextlib.suppress(OSError):
        for p in sorted(APT_LISTS.glob("*Packages*")):
            h.update(f"{p.name} {p.stat().st_mtime_ns}\n".encode())
    return h.hexdigest()


def _resolve_package(cache: Path | None = None) -> str:
    """The versioned kernel package the meta package depends on (override: env).

    apt-cache takes ~1.5 s to parse the lists, so the answer is remembered in ``cache``
    for as long as the lists don't change.
    """
    forced = os.environ.get("DNSGUARD_VM_KERNEL_PACKAGE")
    if forced:
        return forced
    memo = cache / "resolved.json" if cache else None
    key = _apt_lists_key()
    if memo is not None:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads(memo.read_text())
            if saved["lists"] == key and saved["meta"] == META_PACKAGE:
                return str(saved["package"])
    cp = _run_cmd(["apt-cache", "depends", META_PACKAGE])
    for line in cp.stdout.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m:
            if memo is not None:
                saved = {"meta": META_PACKAGE, "lists": key, "package": m.group(1)}
                memo.write_text(json.dumps(saved) + "\n")
            return m.group(1)
    err = (cp.stderr.strip().splitlines() or ["no Depends line"])[-1]
    raise VMError(f"can't resolve {META_PACKAGE} with apt-cache ({err}); run apt-get update")


def _apt_download(package: str, dest: Path) -> Path:
    """``apt-get download`` into dest; on failure ``apt-get update`` once and retry."""
    for attempt in (1, 2):
        cp = _run_cmd(["apt-get", "download", "-q", package], cwd=dest)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if cp.returncode == 0 and debs:
            return debs[-1]
        if attempt == 1:
            # Most likely lists missing or stale (the version was superseded on the mirror).
            up = _run_cmd(["apt-get", "update", "-q"], timeout=600)
            if up.returncode != 0:
                raise VMError(f"apt-get update failed: {up.stderr.strip()[-500:]}")
    raise VMError(f"apt-get download {package} failed: {cp.stderr.strip()[-500:]}")


def _extract_vmlinux(vmlinuz: Path, dest: Path) -> None:
    """Decompress the ELF vmlinux out of an XZ-compressed bzImage (like extract-vmlinux)."""
    data = vmlinuz.read_bytes()
    magic = b"\xfd7zXZ\x00"
    start = data.find(magic)
    while start != -1:
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = dec.decompress(data[start:])
        except lzma.LZMAError:
            out = b""
        if out[:4] == b"\x7fELF":
            dest.write_bytes(out)
            return
        start = data.find(magic, start + 1)
    raise VMError(f"{vmlinuz}: no XZ-compressed ELF inside (kernel compression changed?)")


def _parse_modules_dep(modules_dir: Path) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" in line:
            mod, _, rest = line.partition(":")
            deps[mod.strip()] = rest.split()
    return deps


def _module_name(relpath: str) -> str:
    name = relpath.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def _prune_modules(modules_dir: Path) -> None:
    """Drop modules outside KEEP_MODULE_DIRS, keeping every dependency of those kept."""
    deps = _parse_modules_dep(modules_dir)

    def wanted(rel: str) -> bool:
        sub = rel.removeprefix("kernel/")
        in_keep = any(sub == d or sub.startswith(d + "/") for d in KEEP_MODULE_DIRS)
        in_drop = any(sub.startswith(d + "/") for d in DROP_MODULE_DIRS)
        return in_keep and not in_drop

    keep: set[str] = set()
    todo = [m for m in deps if wanted(m)]
    while todo:
        m = todo.pop()
        if m not in keep:
            keep.add(m)
            todo.extend(deps.get(m, []))
    for m in deps:
        if m not in keep:
            (modules_dir / m).unlink(missing_ok=True)
    # remove directories left empty
    for d in sorted((p for p in modules_dir.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()


def _boot_module_order(modules_dir: Path) -> list[str]:
    """BOOT_MODULES and their dependencies, each after what it depends on (relative paths)."""
    deps = _parse_modules_dep(modules_dir)
    by_name = {_module_name(m): m for m in deps}
    builtin = modules_dir / "modules.builtin"
    builtins = {_module_name(x) for x in builtin.read_text().split()} if builtin.exists() else set()
    order: list[str] = []

    def visit(rel: str, stack: tuple[str, ...]) -> None:
        if rel in order:
            return
        if rel in stack:
            raise VMError(f"module dependency cycle: {' -> '.join((*stack, rel))}")
        for d in deps.get(rel, []):
            visit(d, (*stack, rel))
        order.append(rel)

    for name in BOOT_MODULES:
        if name in by_name:
            visit(by_name[name], ())
        elif name.replace("-", "_") not in builtins:
            raise VMError(f"boot module {name} neither in modules.dep nor built in")
    return order


class _Cpio:
    """Minimal cpio "newc" writer: enough for an initramfs built without root or cpio(1)."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        nameb = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0,
        )  # fmt: skip
        self._buf.write(b"070701" + b"".join(b"%08X" % v for v in fields) + nameb)
        self._buf.write(b"\0" * (-self._buf.tell() % 4))
        self._buf.write(data)
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def dir(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._ino = 0
        self._entry("TRAILER!!!", 0)
        self._buf.write(b"\0" * (-self._buf.tell() % 512))
        return self._buf.getvalue()


def _build_initramfs(kernel_dir: Path, modules_dir: Path) -> Path:
    busybox = _find_busybox()
    if busybox is None:
        raise VMError("no statically linked busybox (apt-get install busybox-static)")
    init = INIT_SCRIPT.read_bytes()
    bb = busybox.read_bytes()
    order = _boot_module_order(modules_dir)
    kos = []
    for rel in order:
        name, data = Path(rel).name, (modules_dir / rel).read_bytes()
        if name.endswith(".xz"):  # busybox insmod may not do compressed modules
            name, data = name.removesuffix(".xz"), lzma.decompress(data)
        kos.append((name, data))
    h = hashlib.sha256(init + bb)
    for name, data in kos:
        h.update(name.encode() + data)
    path = kernel_dir / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if path.exists():
        return path
    c = _Cpio()
    for d in ("bin", "dev", "modules", "proc", "sys", "newroot", "lower", "rw", "job"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    c.file("init", init, 0o755)
    c.file("bin/busybox", bb, 0o755)
    c.symlink("bin/sh", "busybox")
    for name, data in kos:
        c.file(f"modules/{name}", data)
    c.file("modules/order", "".join(f"{name}\n" for name, _ in kos).encode())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(c.finish())
    tmp.replace(path)
    for old in kernel_dir.glob("initramfs-*.cpio"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _kernel_from_meta(kernel_dir: Path) -> Kernel:
    meta = json.loads((kernel_dir / "kernel.json").read_text())
    version = str(meta["version"])
    inits = sorted(kernel_dir.glob("initramfs-*.cpio"))
    return Kernel(
        version=version,
        package=str(meta["package"]),
        package_version=str(meta["package_version"]),
        vmlinuz=kernel_dir / "boot" / f"vmlinuz-{version}",
        image=kernel_dir / "vmlinux",
        modules_dir=kernel_dir / "lib" / "modules" / version,
        initramfs=inits[-1] if inits else kernel_dir / "initramfs-missing.cpio",
    )


def _natural_key(name: str) -> list[tuple[int, str]]:
    """Sort key comparing digit runs as numbers: linux-image-6.1.0-10 > linux-image-6.1.0-9."""
    return [(int(t), "") if t.isdigit() else (-1, t) for t in re.findall(r"\d+|\D+", name)]


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise VMError(f"{cache}/.lock held for 15 min by another prepare") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fetch_kernel(cache: Path, package: str) -> Path:
    """Download, extract, prune, depmod into cache/<package>; returns that directory."""
    final = cache / package
    work = Path(tempfile.mkdtemp(prefix=f".{package}.", dir=cache))
    try:
        deb = _apt_download(package, work)
        root = work / "root"
        cp = _run_cmd(["dpkg-deb", "-x", str(deb), str(root)])
        if cp.returncode != 0:
            raise VMError(f"dpkg-deb -x {deb.name} failed: {cp.stderr.strip()[-500:]}")
        pkg_version = _run_cmd(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
        versions = sorted(p.name for p in (root / "lib" / "modules").iterdir())
        if len(versions) != 1:
            raise VMError(f"{deb.name}: expected one lib/modules/<version>, got {versions}")
        version = versions[0]
        modules_dir = root / "lib" / "modules" / version
        depmod = ["depmod", "-b", str(root), version]
        for step in ("full", "pruned"):
            cp = _run_cmd(depmod)
            if cp.returncode != 0:
                raise VMError(f"depmod ({step}) failed: {cp.stderr.strip()[-500:]}")
            if step == "full":
                _prune_modules(modules_dir)
        shutil.rmtree(root / "usr", ignore_errors=True)
        vmlinuz = root / "boot" / f"vmlinuz-{version}"
        _extract_vmlinux(vmlinuz, root / "vmlinux")
        meta = {"version": version, "package": package, "package_version": pkg_version}
        (root / "kernel.json").write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        root.rename(final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def prepare(cache_dir: Path | None = None) -> Kernel:
    """Make sure a kernel and an initramfs are ready in the cache; return their paths.

    Idempotent and safe to call concurrently (a lock file serialises preparers). Downloads
    only when the package ``linux-image-amd64`` depends on isn't cached yet (then older cached
    kernels are removed); if apt can't resolve it (no lists) but a kernel is cached, that one
    is used. The initramfs is rebuilt when its inputs (init script, busybox, boot modules)
    change. Override the package with ``$DNSGUARD_VM_KERNEL_PACKAGE``.
    """
    cache = (cache_dir or default_cache_dir()).absolute()
    with _locked(cache):
        try:
            package: str | None = _resolve_package(cache)
        except VMError:
            package = None
        cached = {k.package: k for k in _cached_kernels(cache) if k.image.exists()}
        if package is None and cached:
            package = max(cached, key=_natural_key)  # offline: the newest cached
        elif package is None:
            up = _run_cmd(["apt-get", "update", "-q"], timeout=600)
            if up.returncode != 0:
                raise VMError(f"apt-get update failed: {up.stderr.strip()[-500:]}")
            package = _resolve_package(cache)
        kernel_dir = cache / package
        if package not in cached:
            _fetch_kernel(cache, package)
            # A new kernel ABI superseded the cached ones: drop them (~180 MB each).
            for old in cached:
                shutil.rmtree(cache / old, ignore_errors=True)
        kernel = _kernel_from_meta(kernel_dir)
        _build_initramfs(kernel_dir, kernel.modules_dir)
        return _kernel_from_meta(kernel_dir)


# ---------------------------------------------------------------------------------------------
# run


def _env_script(env: Mapping[str, str]) -> str:
    lines = []
    for k, v in env.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise ValueError(f"bad environment variable name {k!r}")
        lines.append(f"export {k}={shlex.quote(v)}\n")
    return "".join(lines) + "unset BASH_ENV\n"


def _qemu_argv(kernel: Kernel, job: Path, *, memory_mb: int, cpus: int) -> list[str]:
    accel = os.environ.get("DNSGUARD_VM_ACCEL", "tcg,thread=multi,tb-size=256")
    # qboot is a minimal firmware: ~0.4 s faster than SeaBIOS under TCG.
    firmware = ["-bios", str(QBOOT)] if QBOOT.exists() else []
    return [
        QEMU,
        *firmware,
        "-accel", accel,
        "-cpu", os.environ.get("DNSGUARD_VM_CPU", "qemu64" if accel.startswith("tcg") else "host"),
        "-M", "q35",
        "-m", str(memory_mb),
        "-smp", str(cpus),
        "-nic", "none",
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-no-user-config",
        "-serial", "stdio",
        "-kernel", str(kernel.image),
        "-initrd", str(kernel.initramfs),
        "-append", " ".join((*KERNEL_CMDLINE, os.environ.get("DNSGUARD_VM_CMDLINE", ""))).strip(),
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=modules,path={kernel.modules_dir},security_model=none,readonly=on",
        "-device", "virtio-9p-pci,fsdev=modules,mount_tag=modules",
        "-fsdev", f"local,id=job,path={job},security_model=none",
        "-device", "virtio-9p-pci,fsdev=job,mount_tag=job",
    ]  # fmt: skip


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _pump(path: Path, pos: int, stream: TextIO) -> int:
    """Copy what ``path`` has past byte ``pos`` to ``stream``; return the new position."""
    try:
        with path.open("rb") as f:
            f.seek(pos)
            data = f.read()
    except OSError:
        return pos
    if data:
        stream.write(data.decode(errors="replace"))
        stream.flush()
    return pos + len(data)


class _LockupWatch:
    """Notices the guest kernel's first soft lockup report on the console.

    A lockup that lasts (a CPU spinning in the kernel) never powers the guest off: without
    this the run would sit out its whole timeout (40 min for the IPVS suite). Reads only what
    the console gained since the last call, and keeps a tail across reads so a marker split
    between two reads is still seen.
    """

    def __init__(self, console: Path) -> None:
        self.console = console
        self.pos = 0
        self.tail = ""
        self.seen_at: float | None = None

    def expired(self, now: float) -> bool:
        """True once a lockup was reported at least LOCKUP_GRACE seconds before ``now``."""
        if self.seen_at is None:
            try:
                with self.console.open("rb") as f:
                    f.seek(self.pos)
                    data = f.read()
            except OSError:
                data = b""
            self.pos += len(data)
            text = self.tail + data.decode(errors="replace")
            if LOCKUP_MARKER in text:
                self.seen_at = now
            self.tail = text[-len(LOCKUP_MARKER):]
        return self.seen_at is not None and now - self.seen_at >= LOCKUP_GRACE


def _lockup_excerpt(console: str, lines: int = 60) -> str:
    """The console from the first soft lockup report on (its stacks), else the tail."""
    at = console.find(LOCKUP_MARKER)
    if at == -1:
        return _tail(console, lines)
    start = console.rfind("\n", 0, at) + 1
    return "\n".join(console[start:].splitlines()[: lines * 2])


def _copy_out(job: Path, out_dir: str | os.PathLike[str] | None) -> None:
    if out_dir is not None:
        shutil.copytree(job / "out", Path(out_dir), dirs_exist_ok=True, symlinks=True)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run(
    script: str,
    *,
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    memory_mb: int = 1024,
    cpus: int = 2,
    cwd: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    kernel: Kernel | None = None,
    stream: TextIO | None = None,
) -> VMResult:
    """Boot the VM, run ``script`` with bash as root in it, return its exit code and output.

    cwd defaults to the host's cwd (the guest sees the same path). ``env`` is added to the
    pass-through variables (PATH, HOME, ...). Files the script writes under ``$DNSGUARD_VM_OUT``
    are copied to ``out_dir`` (if given) after the run. ``stream``, if given, gets the script's
    output live (polled from the job share) as well as in the result. Raises VMTimeoutError
    after ``timeout`` seconds (qemu killed), VMError if the guest never reported an exit code.
    """
    workdir = Path(cwd if cwd is not None else os.getcwd()).absolute()
    for masked in GUEST_MASKED:
        if workdir == Path(masked) or Path(masked) in workdir.parents:
            raise ValueError(f"cwd {workdir} is under {masked}, which the guest mounts anew")
    if not workdir.is_dir():
        raise ValueError(f"cwd {workdir} is not a directory")
    if kernel is None:
        kernel = prepare()

    full_env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
    full_env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    full_env.setdefault("HOME", "/root")
    full_env.update(env or {})
    full_env.update({"DNSGUARD_VM": "1", "DNSGUARD_VM_OUT": GUEST_OUT})

    tmp = Path(tempfile.mkdtemp(prefix="dnsguard-vm-"))
    try:
        job = tmp / "job"
        ctl = job / "ctl"
        ctl.mkdir(parents=True)
        (job / "out").mkdir()
        (ctl / "script.sh").write_text(script)
        (ctl / "env.sh").write_text(_env_script(full_env))
        (ctl / "cwd").write_text(str(workdir))
        console_path = tmp / "console.log"
        argv = _qemu_argv(kernel, job, memory_mb=memory_mb, cpus=cpus)
        start = time.monotonic()
        with console_path.open("wb") as console_f:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=console_f, stderr=subprocess.STDOUT
            )
            deadline = start + timeout
            streamed = 0
            lockup = _LockupWatch(console_path)
            try:
                while True:
                    left = deadline - time.monotonic()
                    try:
                        proc.wait(timeout=max(0.0, min(left, 0.25 if stream else 1.0)))
                        break
                    except subprocess.TimeoutExpired:
                        if stream is not None:
                            streamed = _pump(ctl / "output", streamed, stream)
                        stuck = lockup.expired(time.monotonic())
                        if time.monotonic() < deadline and not stuck:
                            continue
                    proc.kill()  # SIGKILL to our own qemu, by its PID
                    proc.wait(timeout=30)
                    output, console = _read(ctl / "output"), _read(console_path)
                    _copy_out(job, out_dir)
                    why = (f"reported a soft lockup {LOCKUP_GRACE:.0f}s ago" if stuck
                           else f"still running after {timeout:.0f}s")
                    raise VMTimeoutError(
                        f"VM (qemu pid {proc.pid}) {why}, killed.\n"
                        f"--- script output (tail) ---\n{_tail(output)}\n"
                        f"--- console (tail) ---\n{_lockup_excerpt(console)}",
                        pid=proc.pid,
                        output=output,
                        console=console,
                    )
            finally:
                if proc.poll() is None:  # e.g. KeyboardInterrupt while waiting
                    proc.kill()
                    proc.wait(timeout=30)
            if stream is not None:
                _pump(ctl / "output", streamed, stream)
        duration = time.monotonic() - start
        console = _read(console_path)
        output = _read(ctl / "output")
        rc_text = _read(ctl / "rc").strip()
        _copy_out(job, out_dir)
        if not rc_text.lstrip("-").isdigit():
            fatal = _read(ctl / "fatal").strip()
            raise VMError(
                f"the guest reported no exit code (qemu exited {proc.returncode} after "
                f"{duration:.1f}s){': ' + fatal if fatal else ''}\n"
                f"--- script output (tail) ---\n{_tail(output)}\n"
                f"--- console (tail) ---\n{_tail(console)}",
                output=output,
                console=console,
            )
        return VMResult(
            returncode=int(rc_text),
            output=output,
            duration=duration,
            console=console,
            dmesg=_read(ctl / "dmesg"),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# command line: python -m dnsguard.testing.vm {available,prepare,run}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dnsguard.testing.vm", description=__doc__.split("\n")[0]
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("available", help="say whether the harness can run here")
    p_prep = sub.add_parser("prepare", help="download the kernel and build the initramfs")
    p_prep.add_argument("--cache-dir", type=Path)
    p_run = sub.add_parser("run", help="run a bash script (file, or - for stdin) in the VM")
    p_run.add_argument("script")
    p_run.add_argument("--timeout", type=float, default=600)
    p_run.add_argument("--memory-mb", type=int, default=1024)
    p_run.add_argument("--cpus", type=int, default=2)
    p_run.add_argument("--out-dir", type=Path)
    p_run.add_argument("--console", action="store_true", help="print the console log too")
    args = ap.parse_args(argv)

    if args.cmd == "available":
        reason = available()
        print(reason or "ok")
        return 0 if reason is None else 1
    if args.cmd == "prepare":
        k = prepare(args.cache_dir)
        print(f"kernel {k.version} ({k.package} {k.package_version})")
        print(f"image     {k.image}")
        print(f"modules   {k.modules_dir}")
        print(f"initramfs {k.initramfs}")
        print(
            f"cache     {k.image.parent.parent} (this kernel: {_du(k.image.parent) / 1e6:.0f} MB)"
        )
        return 0
    text = sys.stdin.read() if args.script == "-" else Path(args.script).read_text()
    res = run(
        text,
        timeout=args.timeout,
        memory_mb=args.memory_mb,
        cpus=args.cpus,
        out_dir=args.out_dir,
        stream=sys.stdout,
    )
    if res.output and not res.output.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if args.console:
        sys.stderr.write(res.console)
    sys.stderr.write(f"[vm] exit {res.returncode} in {res.duration:.1f}s\n")
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
