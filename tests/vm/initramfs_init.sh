#!/bin/sh
# Stage 1: /init of the busybox initramfs built by tests/vm/runner.py.
# Loads the virtio and 9p modules, mounts the host root (read-only) and the
# repository work tree (read-write, at its host path) over 9p, then hands over
# to tests/vm/guest_init.sh inside the host root with switch_root. switch_root
# rather than chroot because udevadm refuses to act inside a chroot.

/bin/busybox --install -s

fail() {
    echo "zerofs-vm stage1: $*" >/dev/console
    # The runner sees the VM power off without a "started" message and reports
    # a boot failure; the message above lands in console.log.
    poweroff -f
    exec sleep 3600
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
read -r uptime _ </proc/uptime
echo "zerofs-vm: $uptime s stage 1" >/dev/console

repo=
stage2=
venv=
for word in $(cat /proc/cmdline); do
    case "$word" in
        zerofs_vm.repo=*) repo="${word#zerofs_vm.repo=}" ;;
        zerofs_vm.init=*) stage2="${word#zerofs_vm.init=}" ;;
        zerofs_vm.venv=*) venv="${word#zerofs_vm.venv=}" ;;
    esac
done
[ -n "$repo" ] || fail "zerofs_vm.repo= missing from the kernel command line"
[ -n "$stage2" ] || fail "zerofs_vm.init= missing from the kernel command line"

# One "path [params]" per line, in dependency order as computed on the host by
# kmod (modprobe --show-depends against a depmod'ed copy of the kernel's tree).
while read -r module params; do
    [ -n "$module" ] || continue
    # shellcheck disable=SC2086
    insmod "/$module" $params || fail "insmod $module failed"
done </etc/initramfs-modules

# msize=512000, the most the virtio transport accepts, instead of the 128 KiB
# default: fewer 9p round trips for large reads (ELF loading, Python imports).
ninep="trans=virtio,version=9p2000.L,msize=512000"
# The host root does not change under a test run: let the guest cache it.
mount -t 9p -o "$ninep,ro,cache=loose" hostroot /newroot || fail "cannot mount the host root"
[ -d "/newroot$repo" ] || fail "$repo is not a directory in the host root"
# The work tree stays uncached so that host and guest see each other's writes.
mount -t 9p -o "$ninep,rw" worktree "/newroot$repo" || fail "cannot mount the work tree at $repo"
# The repo's virtualenv, when the runner shares it (zerofs_vm.venv=TAG), is
# read-only and cached: Python imports (thousands of stat and open calls) are
# the slowest part of starting pytest over 9p.
if [ -n "$venv" ]; then
    mount -t 9p -o "$ninep,ro,cache=loose" "$venv" "/newroot$repo/.venv" || fail "cannot mount the venv"
fi

for fs in proc sys dev; do
    mount --move "/$fs" "/newroot/$fs" || fail "cannot move /$fs into the new root"
done

[ -f "/newroot$stage2" ] || fail "$stage2 not found in the new root"
exec switch_root /newroot /bin/sh "$stage2"
