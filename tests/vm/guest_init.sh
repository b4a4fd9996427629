#!/bin/sh
# Stage 2: PID 1 of the test VM, run by the host's /bin/sh after switch_root
# into the host root (9p, read-only). Prepares a writable, udev-managed system,
# runs the command the runner wrote into its run directory, reports the exit
# status on the control port and powers off. Everything printed here goes to the
# serial console, which the runner keeps in RUN_DIR/console.log.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

# Guest uptime per boot phase, for finding where boot time goes.
phase() {
    read -r uptime _ </proc/uptime
    echo "zerofs-vm: $uptime s $*"
}

# Only reached when something fails before the command can run: the runner sees
# no "started" message and reports a boot failure with the tail of console.log.
die() {
    echo "zerofs-vm stage2: $*"
    halt_vm
}

halt_vm() {
    busybox poweroff -f
    echo o >/proc/sysrq-trigger
    while :; do sleep 3600; done
}

phase "stage 2"
run_dir=
repo=
net=
for word in $(cat /proc/cmdline); do
    case "$word" in
        zerofs_vm.run=*) run_dir="${word#zerofs_vm.run=}" ;;
        zerofs_vm.repo=*) repo="${word#zerofs_vm.repo=}" ;;
        zerofs_vm.net=*) net="${word#zerofs_vm.net=}" ;;
    esac
done
[ -n "$run_dir" ] && [ -f "$run_dir/guest.conf" ] || die "no run directory on the kernel command line"
# Defines KERNEL_TREE (the extracted kernel package) and the virtio-serial port
# names STDOUT_PORT, STDERR_PORT and CONTROL_PORT.
. "$run_dir/guest.conf"

# /proc, /sys and /dev were moved here by stage 1; the rest is fresh.
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts || die "cannot mount /dev/pts"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm || die "cannot mount /dev/shm"
# The host root is read-only: give commands the usual writable places. /tmp
# and /var/tmp allow device nodes, as on Debian 12 where they live on the root
# filesystem: tests create nbd nodes in their temporary directories.
# A work tree inside one of them (a checkout under /tmp) would be hidden by the
# tmpfs: its mounts are moved aside (devtmpfs is writable) and back on top.
writable_tmpfs() {  # DIR OPTIONS
    held=
    case "$repo/" in
        "$1"/*)
            held=/dev/.zerofs-worktree
            mkdir -p "$held" && mount -n --move "$repo" "$held" || die "cannot move $repo aside"
            ;;
    esac
    mount -t tmpfs -o "$2" tmpfs "$1" || die "cannot mount $1"
    if [ -n "$held" ]; then
        mkdir -p "$repo" && mount -n --move "$held" "$repo" || die "cannot put $repo back"
    fi
}
for dir in /tmp /var/tmp; do
    writable_tmpfs "$dir" mode=1777
done
writable_tmpfs /run mode=755,nosuid,nodev
mkdir -p /run/lock /run/mount
# /var/run is a symlink to /run on Debian; an old-style directory gets its own tmpfs.
if [ ! -L /var/run ]; then
    writable_tmpfs /var/run mode=755,nosuid,nodev
fi
writable_tmpfs /var/log mode=755

# Modules of the guest kernel live in the extracted package on the work-tree
# share. The kernel's own module requests (filesystem types, crypto, ...) go
# through a wrapper that points kmod there; where the host root has a
# /lib/modules to mount on, plain `modprobe` finds them too.
release=$(uname -r)
printf '#!/bin/sh\nexec /sbin/modprobe -d %s "$@"\n' "$KERNEL_TREE" >/run/guest-modprobe
chmod 755 /run/guest-modprobe
echo /run/guest-modprobe >/proc/sys/kernel/modprobe
if [ -d /lib/modules ]; then
    mount -t tmpfs -o mode=755 tmpfs /lib/modules || die "cannot mount /lib/modules"
    mkdir "/lib/modules/$release"
    mount --bind "$KERNEL_TREE/lib/modules/$release" "/lib/modules/$release" \
        || die "cannot bind the kernel modules"
fi

hostname zerofs-vm
busybox ip link set lo up || die "cannot bring up lo"
# A network card only when the runner forwards ports to the host (--forward):
# zerofs_vm.net=ADDRESS/PREFIX,GATEWAY.
if [ -n "$net" ]; then
    /run/guest-modprobe virtio_net || die "cannot load virtio_net"
    tries=0
    until [ -e /sys/class/net/eth0 ]; do
        tries=$((tries + 1))
        [ "$tries" -lt 100 ] || die "no eth0 after loading virtio_net"
        sleep 0.1
    done
    busybox ip link set eth0 up || die "cannot bring up eth0"
    busybox ip addr add "${net%,*}" dev eth0 || die "cannot address eth0"
    busybox ip route add default via "${net#*,}" || die "cannot route through ${net#*,}"
fi
phase "mounts done"

# udevd first, so that it sees the nbd devices appear as on a real node.
/lib/systemd/systemd-udevd --daemon || die "cannot start systemd-udevd"
tries=0
until udevadm control --ping 2>/dev/null; do
    tries=$((tries + 1))
    [ "$tries" -lt 100 ] || die "systemd-udevd does not answer udevadm control --ping"
    sleep 0.1
done
phase "udevd up"

# nbd parameters, chosen for the tests and benchmarks that run here:
# - nbds_max=128: create /dev/nbd0..nbd127 up front, so that benchmarks can
#   attach 64+ devices, 32 of them concurrently, without the kernel creating
#   devices on demand in the middle of a measurement.
# - max_part=0: volumes carry a filesystem directly, never a partition table;
#   with max_part>0 the kernel rescans partitions on every connect, which costs
#   time on each attach and adds uevents. It also overrides the max_part=15 that
#   Debian's nbd-client package sets in /etc/modprobe.d.
# Loading a module is CPU-bound under TCG (about 0.25 s per MB for xfs and
# btrfs): load them in parallel on the guest's CPUs.
modprobe -d "$KERNEL_TREE" nbd nbds_max=128 max_part=0 &
nbd_pid=$!
fs_pids=
for module in ext4 xfs btrfs; do
    modprobe -d "$KERNEL_TREE" "$module" &
    fs_pids="$fs_pids $!"
done
wait "$nbd_pid" || die "cannot load nbd"
for pid in $fs_pids; do
    wait "$pid" || die "cannot load the ext4, xfs and btrfs modules"
done
phase "modules loaded"
udevadm settle --timeout=60 || die "udev events did not settle within 60 s"
phase "udev settled"

port_device() {
    for name_file in /sys/class/virtio-ports/*/name; do
        if [ "$(cat "$name_file")" = "$1" ]; then
            dev="${name_file%/name}"
            echo "/dev/${dev##*/}"
            return 0
        fi
    done
    return 1
}
stdout_dev=$(port_device "$STDOUT_PORT") || die "no virtio port $STDOUT_PORT"
stderr_dev=$(port_device "$STDERR_PORT") || die "no virtio port $STDERR_PORT"
control_dev=$(port_device "$CONTROL_PORT") || die "no virtio port $CONTROL_PORT"

exec 3>"$control_dev" || die "cannot open $control_dev"
phase "command starts"
echo started >&3
# command.sh sets the environment, enters the working directory and execs the
# command; it starts from an empty environment so that nothing of PID 1 leaks.
env -i /bin/sh "$run_dir/command.sh" </dev/null >"$stdout_dev" 2>"$stderr_dev"
status=$?
phase "command exited with status $status"
# A write to a virtio port returns once the host has taken the data, so the
# status is delivered before the power goes off.
echo "exit $status" >&3
exec 3>&-
sync
halt_vm
