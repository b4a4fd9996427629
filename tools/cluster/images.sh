#!/usr/bin/env bash
# Builds the test cluster's images as OCI archives in .cache/kube/<release>/images/, for
# the node's containerd to import (no registry is reachable here): each CSI sidecar the
# chart pins, its binary from make cluster-build alone in one layer, as its entrypoint;
# and the pod sandbox image, pause. An archive newer than its binary is kept. Needs no
# network (the microVM runs it too).
# Usage: tools/cluster/images.sh [IMAGE...]   (IMAGE: pause csi-provisioner ...; default all)
# Prints "<archive> <repository>" per image; import one with
#   ctr -n k8s.io images import --base-name <repository> <archive>
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
out=$("$here/tools/cluster/build.sh" --print-dir)

fail() {
    echo "images.sh: $*" >&2
    exit 1
}

if ! command -v umoci >/dev/null; then
    echo "images.sh: installing umoci (Debian package)" >&2
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends umoci; } \
        >/dev/null 2>&1 || fail "cannot install umoci"
fi

mkdir -p "$out/images"

# pause (make cluster-build compiles it) reports its version: "pause.c v3.10.2".
pause_image() {
    local version
    [[ -x $out/pause ]] || fail "no $out/pause: run make cluster-build"
    version=$("$out/pause" -v | awk '{ print $2 }')
    echo "pause registry.k8s.io/pause ${version#v}"
}

missing=()
found=0
while read -r _key repository tag; do
    name=${repository##*/}
    if (($#)) && [[ " $* " != *" $name "* ]]; then
        continue
    fi
    found=$((found + 1))
    binary=$out/$name
    if [[ ! -x $binary ]]; then
        missing+=("$name")
        continue
    fi
    archive=$out/images/$name-$tag.tar
    if [[ ! $archive -nt $binary ]]; then
        layout=$(mktemp -d)
        trap 'rm -rf "$layout"' EXIT
        {
            umoci init --layout "$layout/oci"
            umoci new --image "$layout/oci:$tag"
            umoci insert --image "$layout/oci:$tag" "$binary" "/$name"
            umoci config --image "$layout/oci:$tag" --config.entrypoint "/$name"
            umoci gc --layout "$layout/oci"
        } >"$out/logs/image-$name.log" 2>&1 \
            || fail "building the $name image failed; its log: $out/logs/image-$name.log"
        tar -C "$layout/oci" -cf "$archive.new" .
        mv "$archive.new" "$archive"
        rm -rf "$layout"
        trap - EXIT
    fi
    echo "$archive $repository"
done <<<"$(
    if (($# == 0)) || [[ " $* " == *" pause "* ]]; then pause_image; fi
    python3 "$here/tools/cluster/chart_images.py"
)"

(($# == 0 || found == $#)) || fail "the chart pins no sidecar image among: $*"
((${#missing[@]} == 0)) \
    || fail "no binary for ${missing[*]} in $out: run make cluster-build (node-driver-registrar and livenessprobe are not served by the Go module proxy)"
