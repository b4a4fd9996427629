#!/usr/bin/env bash
# The node's container runtime works here: containerd and runc from make cluster-build
# import a sidecar image from tools/cluster/images.sh and run it (its --version) in a
# container. Run as root where the node runs: make cluster-runtime-check runs it in the
# microVM. Leaves nothing behind: containerd's root and state are in a temporary folder.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
out=$("$here/tools/cluster/build.sh" --print-dir)
export PATH=$out:$PATH

fail() {
    echo "runtime_check.sh: $*" >&2
    exit 1
}

# Here-strings, not process substitution: the microVM has no /dev/fd.
built=$("$here/tools/cluster/images.sh" csi-provisioner)
read -r archive repository <<<"$built"
tag=${archive##*-}
tag=${tag%.tar}
image=$repository:$tag

# kubelet and containerd need the unified cgroup hierarchy; the VM's init mounts none.
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup \
    || fail "cannot mount cgroup2 on /sys/fs/cgroup"
# The overlayfs snapshotter; in the microVM modules load through its modprobe wrapper.
modprobe=modprobe
[[ -x /run/guest-modprobe ]] && modprobe=/run/guest-modprobe
"$modprobe" overlay || fail "cannot load the overlay module"

work=$(mktemp -d /run/zerofs-runtime-check.XXXXXX)
containerd_pid=
cleanup() {
    if [[ -n $containerd_pid ]]; then
        kill "$containerd_pid" 2>/dev/null || true
        wait "$containerd_pid" 2>/dev/null || true
    fi
    umount -R "$work/root" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cat >"$work/config.toml" <<TOML
version = 3
root = "$work/root"
state = "$work/state"
[grpc]
  address = "$work/containerd.sock"
TOML
started=$(date +%s.%N)
containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
containerd_pid=$!
for _ in $(seq 300); do
    [[ -S $work/containerd.sock ]] && break
    kill -0 "$containerd_pid" 2>/dev/null || break
    sleep 0.2
done
[[ -S $work/containerd.sock ]] || { tail -20 "$work/containerd.log" >&2; fail "containerd did not start"; }
ctr() { command ctr --address "$work/containerd.sock" --namespace k8s.io "$@"; }
ctr images import --base-name "$repository" "$archive" >/dev/null || fail "cannot import $archive"
printed=$(ctr run --rm "$image" runtime-check "/${repository##*/}" --version) \
    || { tail -20 "$work/containerd.log" >&2; fail "cannot run $image"; }
[[ $printed == *"$tag"* ]] || fail "$image printed $printed, not its version $tag"
elapsed=$(echo "$(date +%s.%N) - $started" | bc)
printf 'runtime_check.sh: containerd %s and runc ran %s: %s (%.1f s)\n' \
    "$(containerd --version | awk '{print $3}')" "$image" "$printed" "$elapsed"
