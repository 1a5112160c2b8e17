#!/bin/sh
# /init of the dnsguard VM harness's initramfs (see dnsguard/testing/vm.py).
#
# Runs under busybox sh, in two stages:
#   stage 1 (PID 1 in the initramfs): load the bootstrap modules, mount the host's / read-only
#     over virtio-9p under a tmpfs overlay at /newroot, add /proc /sys /dev /run /tmp and the
#     kernel's modules, then switch_root into the overlay, re-executing this file as stage 2.
#   stage 2 (PID 1 in the overlay): run the job's script with the host's bash, record its exit
#     code in the job share, power off.
#
# 9p shares (mount tags): hostroot = host's / (ro), modules = lib/modules/<ver> of the extracted
# kernel package (ro), job = a host temp dir (rw) holding ctl/{script.sh,env.sh,cwd} on the way
# in, and ctl/{rc,output,dmesg} plus out/ on the way out.
# Every step that can fail reports on the console, which the host keeps for debugging.

BB=/bin/busybox
STATE=/run/dnsguard-vm
JOB=$STATE/job

say() {
    read -r up _ 2>/dev/null < /proc/uptime || read -r up _ 2>/dev/null < /newroot/proc/uptime
    echo "dnsguard-vm [${up:-?}]: $*" > /dev/console
}

die() {
    say "FATAL: $*"
    # leave a trace the host can read if the job share is mounted, then power off
    [ -d /job/ctl ] && echo "stage1: $*" > /job/ctl/fatal
    [ -d "$JOB/ctl" ] && echo "stage2: $*" > "$JOB/ctl/fatal"
    $BB sync
    $BB poweroff -f
    # poweroff can't fail in practice; if it does, a panic with panic=-1 ends qemu (-no-reboot)
    exit 1
}

stage1() {
    $BB mkdir -p /proc /sys /dev /bin /sbin /newroot /lower /rw /job
    $BB --install -s /bin
    export PATH=/bin:/sbin
    mount -t proc proc /proc || die "mount /proc"
    mount -t sysfs sysfs /sys || die "mount /sys"
    mount -t devtmpfs devtmpfs /dev || die "mount /dev"

    say "stage 1: loading modules"
    while read -r ko; do
        [ -n "$ko" ] || continue
        insmod "/modules/$ko" || die "insmod $ko"
    done < /modules/order

    nine="trans=virtio,version=9p2000.L,msize=512000"
    # The host's / doesn't change under a test run: let the guest cache it (fast imports).
    mount -t 9p -o "$nine,ro,cache=loose" hostroot /lower || die "mount 9p hostroot"
    # The job share is how results get out: no caching.
    mount -t 9p -o "$nine,rw,cache=none" job /job || die "mount 9p job"

    mount -t tmpfs -o mode=0755 rw /rw || die "mount tmpfs for the overlay"
    mkdir -p /rw/upper /rw/work
    mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
        || die "mount overlay"

    for d in proc sys dev; do
        mount --move "/$d" "/newroot/$d" || die "move /$d"
    done
    mount -t tmpfs -o mode=0755,nosuid,nodev run /newroot/run || die "mount /run"
    # /tmp stays part of the overlay: a checkout under the host's /tmp (a CI clone) is visible
    # in the guest, and what the guest writes there lands in the overlay's RAM, not the host
    mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/run/lock /newroot/run/netns
    mount -t devpts -o mode=0620,ptmxmode=0666 devpts /newroot/dev/pts || die "mount devpts"
    mount -t tmpfs -o mode=1777,nosuid,nodev shm /newroot/dev/shm || die "mount /dev/shm"
    mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup 2>/dev/null || say "no cgroup2 (ignored)"

    kver=$(uname -r)
    # /lib may be a symlink to usr/lib on the host: mkdir -p follows it inside the overlay.
    mkdir -p "/newroot/lib/modules/$kver" || die "mkdir lib/modules"
    mount -t 9p -o "$nine,ro,cache=loose" modules "/newroot/lib/modules/$kver" \
        || die "mount 9p modules"

    mkdir -p "$STATE" "/newroot$JOB" || die "mkdir $STATE"
    cp /bin/busybox "/newroot$STATE/busybox" || die "copy busybox"
    cp /init "/newroot$STATE/init" || die "copy init"
    mount --move /job "/newroot$JOB" || die "move job share"

    say "stage 1: switching to the overlay root"
    exec switch_root /newroot "$STATE/busybox" sh "$STATE/init" stage2
    die "switch_root"
}

stage2() {
    BB=$STATE/busybox
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    ctl=$JOB/ctl
    $BB hostname dnsguard-vm
    $BB ip link set lo up 2>/dev/null
    $BB ln -s /proc/self/fd /dev/fd 2>/dev/null
    $BB ln -s /proc/self/fd/0 /dev/stdin 2>/dev/null
    $BB ln -s /proc/self/fd/1 /dev/stdout 2>/dev/null
    $BB ln -s /proc/self/fd/2 /dev/stderr 2>/dev/null

    [ -x /bin/bash ] || die "no /bin/bash on the host's filesystem"
    say "running the job script"
    # The script's output goes to a file in the job share, which the host can follow live (a
    # pipe to the console would hang on daemons the script leaves running, a file doesn't).
    # env -i: the script sees exactly the variables the host chose: bash sources BASH_ENV
    # (env.sh: exports, then unset BASH_ENV) before the script, saving a second bash start.
    # The exit code is bash's, collected by this shell (its parent), nothing else's.
    (
        cd "$($BB cat "$ctl/cwd")" || exit 125
        exec $BB env -i BASH_ENV="$ctl/env.sh" /bin/bash "$ctl/script.sh" < /dev/null
    ) > "$ctl/output" 2>&1
    rc=$?
    $BB dmesg > "$ctl/dmesg" 2>&1
    echo "$rc" > "$ctl/rc.tmp" && $BB mv "$ctl/rc.tmp" "$ctl/rc"
    say "script exited with $rc"
    $BB sync
    $BB poweroff -f
}

case "$1" in
    stage2) stage2 ;;
    *) stage1 ;;
esac
