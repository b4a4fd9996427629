#!/usr/bin/env bash
# The node's container runtime runs every image of make cluster-images: containerd and runc
# from make cluster-build import each archive as the node does (ctr images import
# --base-name) and run each image's entrypoint, as containerd has it, with a short action:
#   pause, the Go sidecars, the sidecar stand-ins  their version (read-only root)
#   zerofs-csi      zerofs-csi --version, and the attach-path extension imported
#   python          pip installs a package system-wide
#   busybox         sh, dd and sha256sum
#   zerofs          (when ZEROFS_BIN made it) `zerofs --version` and perl with the modules
#                   of the readiness probe and the fence guard
#   zerofs-standin  `zerofs --help`, then the stand-in serving a file:// volume as the kube
#                   backend runs it (uid 1001, read-only root, seccomp, the socket
#                   directory at the same path) until the driver's own readiness probe (perl,
#                   exec'd in the container) passes, and a clean exit on SIGTERM
# Run as root where the node runs: make cluster-runtime-check runs it in the microVM, after
# building the archives on the host (the microVM has no network). Leaves nothing behind:
# containerd's root and state are in a temporary folder.
# Usage: tools/cluster/runtime_check.sh [LISTING]
#   LISTING: the output of images.sh --built, made where the archives were built; without
#   it, images.sh --built runs here (digesting the inputs takes minutes in the microVM)
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
out=$("$here/tools/cluster/build.sh" --print-dir)
export PATH=$out:$PATH

fail() {
    echo "runtime_check.sh: $*" >&2
    exit 1
}

# Here-strings, not process substitution: the microVM has no /dev/fd.
if (($#)); then
    listing=$(cat "$1")
else
    listing=$("$here/tools/cluster/images.sh" --built)
fi
[[ -n $listing ]] || fail "no images listed"
# The module the Dockerfile itself imports to check the extension.
extension=$(sed -n 's/.*python -c "import \(zerofs_csi[._a-z]*\)".*/\1/p' "$here/Dockerfile")
[[ -n $extension ]] || fail "the Dockerfile imports no zerofs_csi extension module"

# kubelet and containerd need the unified cgroup hierarchy; the VM's init mounts none.
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup \
    || fail "cannot mount cgroup2 on /sys/fs/cgroup"
# The overlayfs snapshotter; in the microVM modules load through its modprobe wrapper.
modprobe=modprobe
[[ -x /run/guest-modprobe ]] && modprobe=/run/guest-modprobe
"$modprobe" overlay || fail "cannot load the overlay module"

work=$(mktemp -d /run/zerofs-runtime-check.XXXXXX)
containerd_pid=
server_pid=
cleanup() {
    for pid in $server_pid $containerd_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
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

elapsed() { echo "$(date +%s.%N) - $1" | bc; }

# The tag is in the archive's name: <last part of the repository>-<tag>.tar.
reference_of() { # ARCHIVE REPOSITORY
    local tag=${1##*/}
    tag=${tag#"${2##*/}-"}
    echo "$2:${tag%.tar}"
}

while read -r archive repository; do
    at=$(date +%s.%N)
    ctr images import --base-name "$repository" "$archive" >/dev/null \
        || { tail -20 "$work/containerd.log" >&2; fail "cannot import $archive"; }
    printf 'runtime_check.sh: imported %s (%s) in %.1f s\n' \
        "$(reference_of "$archive" "$repository")" "$(du -h "$archive" | cut -f1)" "$(elapsed "$at")"
done <<<"$listing"

# The image's entrypoint as containerd has it (kubelet runs it with the pod's args), one
# word a line.
entrypoint() { # REFERENCE
    local manifest config
    manifest=$(ctr images ls "name==$1" | awk 'NR == 2 { print $3 }')
    [[ -n $manifest ]] || fail "containerd has no image $1"
    config=$(ctr content get "$manifest" | python3 -c 'import json, sys; print(json.load(sys.stdin)["config"]["digest"])')
    ctr content get "$config" \
        | python3 -c 'import json, sys; print(*json.load(sys.stdin)["config"].get("Entrypoint") or [], sep="\n")'
}

runs=0
# Runs ARGV in a new container of REFERENCE with ctr run's OPTIONs and checks that its
# output holds EXPECTED.
check() { # REFERENCE EXPECTED [OPTION...] -- ARGV...
    local reference=$1 expected=$2 options=() output
    shift 2
    while [[ $1 != -- ]]; do
        options+=("$1")
        shift
    done
    shift
    runs=$((runs + 1))
    output=$(ctr run --rm "${options[@]}" "$reference" "runtime-check-$runs" "$@" </dev/null 2>&1) \
        || { echo "$output" >&2; tail -20 "$work/containerd.log" >&2; fail "$reference: '$*' failed"; }
    [[ $output == *"$expected"* ]] || fail "$reference: '$*' printed '$output', which lacks '$expected'"
    printf 'runtime_check.sh: %s: %s\n' "$reference" "$(grep -F -m1 -- "$expected" <<<"$output")"
}

# The stand-in serves a file:// volume in a container set up as the kube backend's pod
# (servers/pods/objects.py volume_pod), until the readiness probe the driver gives that
# pod passes in it; then SIGTERM stops it cleanly.
check_server() { # REFERENCE ENTRYPOINT...
    local reference=$1 volume=$work/volume at
    shift
    mkdir -p "$volume/data" "$volume/cache" "$volume/tmp"
    chmod 1777 "$volume/tmp"
    cat >"$volume/zerofs.toml" <<TOML
[cache]
dir = "$volume/cache"
disk_size_gb = 1.0
[storage]
url = "file://$volume/data"
encryption_password = "runtime-check"
[servers.nbd]
unix_socket = "$volume/nbd.sock"
[servers.ninep]
unix_socket = "$volume/9p.sock"
TOML
    chown -R 1001:1001 "$volume/data" "$volume/cache"
    chown 1001:1001 "$volume"
    at=$(date +%s.%N)
    ctr run --rm --read-only --seccomp --user 1001:1001 \
        --mount "type=bind,src=$volume,dst=$volume,options=rbind:rw" \
        --mount "type=bind,src=$volume/tmp,dst=/tmp,options=rbind:rw" \
        "$reference" runtime-check-server "$@" run --config "$volume/zerofs.toml" \
        </dev/null >"$work/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1200); do
        [[ -S $volume/nbd.sock && -S $volume/9p.sock ]] && break
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    [[ -S $volume/nbd.sock && -S $volume/9p.sock ]] \
        || { cat "$work/server.log" >&2; fail "$reference did not serve the volume"; }
    "$here/.venv/bin/python" - "$work/containerd.sock" "$volume" <<'PY' \
        || { cat "$work/server.log" >&2; fail "$reference: the readiness probe failed"; }
import subprocess
import sys
from pathlib import Path

from zerofs_csi.servers.base import ServerSockets
from zerofs_csi.servers.pods.objects import readiness_command

address, volume = sys.argv[1], Path(sys.argv[2])
probe = readiness_command(ServerSockets(volume, volume / "nbd.sock", volume / "9p.sock"))
ctr = ["ctr", "--address", address, "--namespace", "k8s.io"]
exec_probe = [*ctr, "task", "exec", "--exec-id", "readiness", "runtime-check-server", *probe]
sys.exit(subprocess.run(exec_probe, timeout=60).returncode)
PY
    printf 'runtime_check.sh: %s served the volume, readiness probe passed in %.1f s\n' \
        "$reference" "$(elapsed "$at")"
    ctr task kill --signal SIGTERM runtime-check-server
    local status=0
    wait "$server_pid" || status=$?
    server_pid=
    ((status == 0)) || { cat "$work/server.log" >&2; fail "$reference exited $status on SIGTERM"; }
    [[ ! -e $volume/nbd.sock && ! -e $volume/9p.sock ]] || fail "$reference left its sockets"
}

while read -r archive repository; do
    reference=$(reference_of "$archive" "$repository")
    tag=${reference##*:}
    entry=()
    while read -r word; do [[ -n $word ]] && entry+=("$word"); done <<<"$(entrypoint "$reference")"
    case ${repository##*/} in
        pause)
            check "$reference" "v$tag" --read-only -- "${entry[@]}" -v
            ;;
        csi-node-driver-registrar | livenessprobe)
            check "$reference" "$tag (zerofs-csi stand-in)" --read-only -- "${entry[@]}" --version
            ;;
        csi-*)
            check "$reference" "$tag" --read-only -- "${entry[@]}" --version
            ;;
        zerofs-csi)
            check "$reference" "$tag" --read-only -- "${entry[@]}" --version
            check "$reference" "$extension imported" --read-only -- \
                python -c "import $extension; print('$extension', 'imported')"
            ;;
        python)
            check "$reference" "pip installed a package for python 3.11" -- sh -ec '
                mkdir -p /tmp/probe/probe && echo "VALUE = 1" >/tmp/probe/probe/__init__.py
                printf "from setuptools import setup\nsetup(name=\"probe\", version=\"1\", packages=[\"probe\"])\n" >/tmp/probe/setup.py
                python -m pip install --quiet --no-index --no-build-isolation /tmp/probe 2>&1
                python -c "import probe, sys; print(\"pip installed a package for python\", sys.version.split()[0])"'
            ;;
        busybox)
            check "$reference" "edeaaff3f1774ad2888673770c6d64097e391bc362d7d6fb34982ddf0efd18cb" \
                --read-only -- sh -c 'dd if=/dev/zero bs=1024 count=4 2>/dev/null | wc -c; echo abc | sha256sum'
            ;;
        zerofs-standin)
            check "$reference" "usage: zerofs" --read-only --user 1001:1001 -- "${entry[@]}" --help
            check_server "$reference" "${entry[@]}"
            ;;
        zerofs)
            check "$reference" "zerofs ${tag%%-*}" --read-only --user 1001:1001 -- "${entry[@]}" --version
            check "$reference" "perl for the readiness probe" --read-only --user 1001:1001 -- \
                perl -MIO::Socket::UNIX -e 'print "perl for the readiness probe and the fence guard\n"'
            ;;
        *) fail "no check for $reference" ;;
    esac
done <<<"$listing"

printf 'runtime_check.sh: containerd %s and runc ran %d containers of %d images in %.1f s\n' \
    "$(containerd --version | awk '{print $3}')" "$((runs + 1))" "$(wc -l <<<"$listing")" \
    "$(elapsed "$started")"
