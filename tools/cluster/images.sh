#!/usr/bin/env bash
# Builds every image the test cluster runs as an OCI archive in <cache>/kube/<release>/images/,
# for the node's containerd to import (no registry is reachable here), each named as the
# chart and the driver refer to it:
#   pause                      registry.k8s.io/pause, the pod sandbox (make cluster-build)
#   csi-provisioner, csi-attacher, csi-resizer
#                              the chart's sidecars, their binaries from make cluster-build
#                              alone in one layer (umoci)
#   csi-node-driver-registrar, livenessprobe
#                              the chart's names and tags, but the project's stand-ins
#                              (tools/cluster/sidecars/, on the python image): the Go
#                              module proxy does not serve these two releases (README,
#                              "Test cluster images")
#   zerofs-csi                 ghcr.io/zerofs-csi/zerofs-csi:<Chart.yaml appVersion>, from
#                              the project's Dockerfile (buildah)
#   zerofs-standin             localhost/zerofs-standin:<inputs digest>, the per-volume
#                              server: a StorageClass's `image` parameter names it
#   zerofs                     localhost/zerofs:<version>-<binary digest>, the per-volume
#                              server with a real ZeroFS: only when there is one (ZEROFS_BIN,
#                              else zerofs on PATH), which the e2e then runs
#   python                     localhost/python:3.11, made with mmdebstrap from Debian's
#                              packages in place of docker.io/library/python:3.11-slim-bookworm:
#                              the Dockerfile's base and the tests' workload pods
#   busybox                    localhost/busybox:<version>, Debian's busybox-static, for
#                              the validation chart's pods (sh, dd, sha256sum)
# An image is rebuilt only when what it is made of changed: <archive>.inputs holds the
# digest of its inputs (sources, recipe, and its base's digest). A failed build names the
# image and its log (<cache>/kube/<release>/logs/image-<name>.log; <cache> is what
# tools/cache-dir prints). buildah's storage (vfs) is <cache>/buildah/. Builds hold
# images/.lock, which readers of the archives may hold shared (flock --shared) so that no
# archive is replaced under them.
#
# Usage: tools/cluster/images.sh [--built] [--references] [IMAGE...]   (default: all)
#   prints "<archive> <repository>" per image (the archive holds one image, tagged; its
#   file name is <last part of the repository>-<tag>.tar); import one with
#     ctr -n k8s.io images import --base-name <repository> <archive>
#   --built       build nothing, fail on an archive missing or older than its inputs
#   --references  print "<repository>:<tag>" instead
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
out=$("$here/tools/cluster/build.sh" --print-dir)
images=$out/images
logs=$out/logs
store=$("$here/tools/cache-dir")/buildah

fail() {
    echo "images.sh: $*" >&2
    exit 1
}

build=1
print=archive
while [[ ${1-} == --* ]]; do
    case $1 in
        --built) build=0 ;;
        --references) print=reference ;;
        *) fail "unknown option $1" ;;
    esac
    shift
done

# The two sidecars the module proxy does not serve, built from tools/cluster/sidecars/.
STANDIN_SIDECARS=(csi-node-driver-registrar livenessprobe)
standin() { [[ " ${STANDIN_SIDECARS[*]} " == *" $1 "* ]]; }
PYTHON_BASE=localhost/python:3.11
SERVER_REPOSITORY=localhost/zerofs-standin
ZEROFS_REPOSITORY=localhost/zerofs
PLUGIN_REPOSITORY=ghcr.io/zerofs-csi/zerofs-csi

# The Python base: Debian 12's python3 (3.11), pip and the C headers the Dockerfile's
# build stage compiles against, as in the python:3.11-slim image; merged /usr the way
# debootstrap makes it (no usrmerge, which would bring perl); no documentation or
# locales; no static libpython; pip may install system-wide (PEP 668's marker removed).
DEBIAN_SUITE=bookworm
DEBIAN_MIRRORS=(
    "deb http://deb.debian.org/debian bookworm main"
    "deb http://deb.debian.org/debian bookworm-updates main"
    "deb http://deb.debian.org/debian-security bookworm-security main"
)
# shellcheck disable=SC2016 # the customize hook's $1, the root it customizes
MMDEBSTRAP_OPTIONS=(
    --mode=root --format=tar --variant=minbase
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
    --include=python3 --include=python3-pip --include=python-is-python3
    --include=libpython3.11-dev
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-include=/usr/share/locale/locale.alias'
    --dpkgopt='path-exclude=/usr/lib/python3.11/config-3.11-x86_64-linux-gnu/*.a'
    --customize-hook='rm -f "$1/usr/lib/python3.11/EXTERNALLY-MANAGED"'
)
PYTHON_BASE_CONFIG=(
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    --env LANG=C.UTF-8 --cmd python3
)

# A Debian package's program, installed when missing (build mode only).
need() { # COMMAND PACKAGE
    command -v "$1" >/dev/null && return
    ((build)) || fail "$1 is not installed (Debian package $2)"
    echo "images.sh: installing $2 (Debian package)" >&2
    "$here/tools/apt-install" "$2" >"$logs/install-$2.log" 2>&1 || fail "cannot install $2; its log: $logs/install-$2.log"
}

buildah_() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }

digest() { sha256sum | cut -c1-64; }

# The files git sees under PATHs (tracked, or new and not ignored), one a line: what a
# build copies from the work tree, without its build products.
tree_files() { # PATH...
    git -C "$here" ls-files --cached --others --exclude-standard -- "$@" | sort -u \
        | while read -r file; do
            if [[ -f $here/$file ]]; then echo "$file"; fi
        done
}

# The names and contents of those files.
tree_digest() { # PATH...
    local files
    files=$(tree_files "$@")
    [[ -z $files ]] || (cd "$here" && xargs -d '\n' sha256sum --) <<<"$files" | digest
}

# RUN steps reach PyPI with the host's trust store (which may hold the CA of a proxy the
# host goes through); the images keep their own.
build_trust=()
[[ -f /etc/ssl/certs/ca-certificates.crt ]] \
    && build_trust=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)

bud() { # ARGS... : buildah build, with the base images from buildah's storage only
    buildah_ bud --pull=never --isolation chroot "${build_trust[@]}" "$@"
}

# Writes the archive of REFERENCE (in buildah's storage), tagged TAG only.
export_archive() { # REFERENCE ARCHIVE TAG
    rm -f "$2.new"
    buildah_ push --quiet "$1" "oci-archive:$2.new:$3"
    mv "$2.new" "$2"
}

archive_of() { # REPOSITORY TAG
    echo "$images/${1##*/}-$2.tar"
}

# An image others build on, in buildah's storage: taken back from its archive when the
# storage was emptied.
in_store() { # REFERENCE
    buildah_ inspect --type image "$1" >/dev/null 2>&1 && return
    local id
    id=$(buildah_ pull --quiet "oci-archive:$(archive_of "${1%:*}" "${1##*:}")") \
        && buildah_ tag "$id" "$1"
}

# The plugin's build keeps its steps' layers (--layers), so that a change of the source
# rebuilds and re-imports only the layers from the wheel on, not the packages below it.
# Those layers are unnamed images, which a prune would remove: storage past this size is
# pruned whole, and the next build starts its cache again.
STORE_PRUNE_BYTES=$((6 << 30))

# Drops REPOSITORY's images tagged other than TAG from buildah's storage and their
# archives; prunes the storage when it is past STORE_PRUNE_BYTES.
drop_older() { # REPOSITORY TAG
    local old
    for old in $(buildah_ images --noheading --format '{{.Name}}:{{.Tag}}'); do
        if [[ ${old%:*} == "$1" && $old != "$1:$2" ]]; then buildah_ rmi "$old" >/dev/null; fi
    done
    local base=${1##*/} other
    for old in "$images/$base"-*.tar; do
        # Another image's name may begin with this one's and a dash (zerofs-csi-*.tar
        # matches zerofs-*): its archives are not this image's.
        for other in $image_names; do
            [[ $other == "$base"-* && $old == "$images/$other"-*.tar ]] && continue 2
        done
        [[ -e $old && $old != "$images/$base-$2.tar" ]] && rm -f "$old" "$old.inputs"
    done
    if (($(du -sb "$store" | cut -f1) > STORE_PRUNE_BYTES)); then
        buildah_ rmi --prune >/dev/null 2>&1 || true
    fi
}

# --- what each image is made of, and how it is built -----------------------------------
# Each *_inputs prints the digest of what the image is made of, its base's digest included.

python_base_inputs() {
    printf '%s\n' "${MMDEBSTRAP_OPTIONS[@]}" "$DEBIAN_SUITE" "${DEBIAN_MIRRORS[@]}" \
        "${PYTHON_BASE_CONFIG[@]}" | digest
}

build_python_base() { # REFERENCE
    need mmdebstrap mmdebstrap
    local rootfs container
    rootfs=$(mktemp -p "$store" rootfs.XXXXXX.tar)
    mmdebstrap "${MMDEBSTRAP_OPTIONS[@]}" "$DEBIAN_SUITE" "$rootfs" "${DEBIAN_MIRRORS[@]}" \
        || { rm -f "$rootfs"; return 1; }
    container=$(buildah_ from scratch)
    buildah_ add "$container" "$rootfs" /
    rm -f "$rootfs"
    buildah_ config "${PYTHON_BASE_CONFIG[@]}" "$container"
    buildah_ commit --rm "$container" "$1"
}

# The Dockerfile's context is what .dockerignore lets in (its "!" lines).
plugin_inputs() {
    local context
    mapfile -t context <<<"$(sed -n 's/^!//p' "$here/.dockerignore")"
    {
        cat "$here/Dockerfile" "$here/.dockerignore"
        tree_digest "${context[@]}"
        echo "$python_base_digest"
    } | digest
}

build_plugin() { # REFERENCE
    in_store "$PYTHON_BASE"
    bud --layers --build-arg "PYTHON_IMAGE=$PYTHON_BASE" -f "$here/Dockerfile" -t "$1" "$here"
}

# The stand-ins' programs and the APIs they speak.
STANDIN_SIDECAR_SOURCES=(tools/cluster/sidecars proto/csi.proto)

standin_sidecars_inputs() {
    { tree_digest "${STANDIN_SIDECAR_SOURCES[@]}" && echo "$python_base_digest"; } | digest
}

# The stand-ins' common image (built once for both), then REFERENCE from it with PROGRAM
# (the path of the real image's binary) as its entrypoint and the release it stands in
# for as its version.
build_standin_sidecar() { # PROGRAM VERSION REFERENCE
    local common container context
    common=localhost/csi-sidecar-standins:${standin_digest:0:12}
    if ! buildah_ inspect --type image "$common" >/dev/null 2>&1; then
        in_store "$PYTHON_BASE"
        context=$(mktemp -d -p "$store" context.XXXXXX)
        (cd "$here" && xargs -d '\n' cp -t "$context" --) <<<"$(tree_files "${STANDIN_SIDECAR_SOURCES[@]}")"
        bud --build-arg "PYTHON_IMAGE=$PYTHON_BASE" -t "$common" \
            -f "$context/Containerfile" "$context" || { rm -rf "$context"; return 1; }
        rm -rf "$context"
        drop_older "${common%:*}" "${common##*:}"
    fi
    container=$(buildah_ from --pull=never "$common")
    buildah_ config --entrypoint "[\"$1\"]" --env "CSI_SIDECAR_STANDIN_VERSION=$2" "$container"
    buildah_ commit --rm "$container" "$3"
}

server_inputs() {
    {
        cat "$here/tools/cluster/zerofs-standin.Containerfile"
        tree_digest 'tools/zerofs_standin*.py' tools/zerofs_standin_admin.pb tools/zerofs-standin
        echo "$python_base_digest"
    } | digest
}

build_server() { # REFERENCE
    in_store "$PYTHON_BASE"
    bud --build-arg "PYTHON_IMAGE=$PYTHON_BASE" -t "$1" \
        -f "$here/tools/cluster/zerofs-standin.Containerfile" "$here/tools"
}

# The real ZeroFS binary, when there is one, as bench/zerofs_server.py chooses it.
zerofs_binary() {
    if [[ -n ${ZEROFS_BIN-} ]]; then
        [[ -x $ZEROFS_BIN && -f $ZEROFS_BIN ]] || fail "ZEROFS_BIN=$ZEROFS_BIN is not an executable file"
        echo "$ZEROFS_BIN"
    else
        command -v zerofs || true
    fi
}

zerofs_inputs() { # BINARY
    {
        cat "$here/tools/cluster/zerofs.Containerfile"
        digest <"$1"
        echo "$python_base_digest"
    } | digest
}

build_zerofs() { # BINARY REFERENCE
    local context
    in_store "$PYTHON_BASE"
    context=$(mktemp -d -p "$store" context.XXXXXX)
    cp "$1" "$context/zerofs"
    bud --build-arg "PYTHON_IMAGE=$PYTHON_BASE" -t "$2" \
        -f "$here/tools/cluster/zerofs.Containerfile" "$context" || { rm -rf "$context"; return 1; }
    rm -rf "$context"
}

# An image of one layer, the directory ROOT, configured by umoci's CONFIG-FLAGs.
umoci_image() { # ROOT TAG ARCHIVE CONFIG-FLAG...
    local layout
    layout=$(mktemp -d -p "$images")
    chmod 755 "$1"
    umoci init --layout "$layout/oci"
    umoci new --image "$layout/oci:$2"
    umoci insert --image "$layout/oci:$2" "$1" /
    umoci config --image "$layout/oci:$2" "${@:4}"
    umoci gc --layout "$layout/oci"
    tar -C "$layout/oci" -cf "$3.new" .
    mv "$3.new" "$3"
    rm -rf "$layout"
}

# A Go binary from make cluster-build alone, as its entrypoint.
build_binary_image() { # BINARY TAG ARCHIVE
    local root
    root=$(mktemp -d -p "$images")
    cp "$1" "$root/"
    umoci_image "$root" "$2" "$3" --config.entrypoint "/${1##*/}"
    rm -rf "$root"
}

# busybox with a link for each of its applets, and sh as the command.
build_busybox_image() { # BINARY TAG ARCHIVE
    local root applet
    root=$(mktemp -d -p "$images")
    mkdir -p "$root/bin" "$root/tmp"
    chmod 1777 "$root/tmp"
    cp "$1" "$root/bin/busybox"
    for applet in $("$1" --list-full); do
        [[ -e $root/$applet ]] && continue
        mkdir -p "$root/$(dirname "$applet")"
        ln -s /bin/busybox "$root/$applet"
    done
    umoci_image "$root" "$2" "$3" --config.cmd sh \
        --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    rm -rf "$root"
}

# --- the images ------------------------------------------------------------------------

sidecars=$(python3 "$here/tools/cluster/chart_images.py")
sidecar_names=" $(awk '{ sub(".*/", "", $2); printf "%s ", $2 }' <<<"$sidecars")"
# Each image's name, which begins its archives' names.
image_names="pause python busybox zerofs-csi zerofs-standin zerofs$sidecar_names"
for name; do
    [[ " $image_names " == *" $name "* ]] || fail "no image named $name; images: $image_names"
done
wanted=" $* "
zerofs=$(zerofs_binary)
[[ -n $zerofs || $wanted != *" zerofs "* ]] || fail "no ZeroFS to make the zerofs image of: set ZEROFS_BIN"
# Printed: the images named, or every image (zerofs only when there is a ZeroFS).
shown() { # NAME
    [[ $1 != zerofs || -n $zerofs ]] || return 1
    [[ $wanted == "  " || $wanted == *" $1 "* ]]
}
# Built (or checked) when printed or when an image printed builds on it.
needed() { # NAME...
    local name
    for name; do shown "$name" && return 0; done
    return 1
}

mkdir -p "$images" "$logs" "$store"
locked=0
lock() {
    ((locked)) && return
    exec 9>"$images/.lock"
    flock 9
    locked=1
}
plugin_tag=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$here/charts/zerofs-csi/Chart.yaml")
[[ -n $plugin_tag ]] || fail "no appVersion in charts/zerofs-csi/Chart.yaml"

# Whether ARCHIVE was made from INPUTS.
current() { # ARCHIVE INPUTS
    [[ -f $1 && $(cat "$1.inputs" 2>/dev/null) == "$2" ]]
}

lines=()
# Makes NAME's archive current (with --built: checks that it is) and records its line.
# INPUTS is the digest of what it is made of. BUILD... puts REPOSITORY:TAG in buildah's
# storage (it gets that reference as its last argument), or is "-" and a command that
# writes the archive itself (it gets the archive's path).
image() { # NAME REPOSITORY TAG INPUTS BUILD...
    local name=$1 repository=$2 tag=$3 inputs=$4
    shift 4
    local archive log=$logs/image-$name.log started
    archive=$(archive_of "$repository" "$tag")
    if ! current "$archive" "$inputs"; then
        ((build)) || fail "the $name image is not built, or older than its sources ($archive): run make cluster-images"
        lock
    fi
    if ! current "$archive" "$inputs"; then
        echo "images.sh: building the $name image ($repository:$tag)" >&2
        started=$SECONDS
        if [[ $1 == - ]]; then
            "${@:2}" "$archive" >"$log" 2>&1 || fail "building the $name image failed; its log: $log"
        else
            {
                "$@" "$repository:$tag" \
                    && export_archive "$repository:$tag" "$archive" "$tag" \
                    && drop_older "$repository" "$tag"
            } >"$log" 2>&1 || fail "building the $name image failed; its log: $log"
        fi
        echo "$inputs" >"$archive.inputs"
        echo "images.sh: built the $name image in $((SECONDS - started)) s ($(du -h "$archive" | cut -f1))" >&2
    fi
    shown "$name" || return 0
    if [[ $print == reference ]]; then
        lines+=("$repository:$tag")
    else
        lines+=("$archive $repository")
    fi
}

if shown pause; then
    [[ -x $out/pause ]] || fail "no $out/pause: run make cluster-build"
    pause_version=$("$out/pause" -v | awk '{ print $2 }')
    pause_version=${pause_version#v}
    ((build)) && need umoci umoci
    image pause registry.k8s.io/pause "$pause_version" "$(digest <"$out/pause")" \
        - build_binary_image "$out/pause" "$pause_version"
fi

while read -r _key repository tag; do
    name=${repository##*/}
    if ! shown "$name" || standin "$name"; then continue; fi
    binary=$out/$name
    [[ -x $binary ]] || fail "no binary for $name in $out: run make cluster-build"
    ((build)) && need umoci umoci
    image "$name" "$repository" "$tag" "$(digest <"$binary")" - build_binary_image "$binary" "$tag"
done <<<"$sidecars"

if shown busybox; then
    ((build)) && need umoci umoci && need busybox busybox-static
    busybox=$(dpkg -L busybox-static | grep -m1 '/bin/busybox$') \
        || fail "busybox-static is not installed (Debian package)"
    busybox_version=$("$busybox" | sed -n '1s/^BusyBox v\([0-9.]*\).*/\1/p')
    image busybox localhost/busybox "$busybox_version" "$(digest <"$busybox")" \
        - build_busybox_image "$busybox" "$busybox_version"
fi

if needed python zerofs-csi zerofs-standin zerofs "${STANDIN_SIDECARS[@]}"; then
    ((build)) && need buildah buildah
    python_base_digest=$(python_base_inputs)
    image python "${PYTHON_BASE%:*}" "${PYTHON_BASE##*:}" "$python_base_digest" build_python_base
fi
if shown zerofs-csi; then
    image zerofs-csi "$PLUGIN_REPOSITORY" "$plugin_tag" "$(plugin_inputs)" build_plugin
fi
if needed "${STANDIN_SIDECARS[@]}"; then
    standin_digest=$(standin_sidecars_inputs)
    while read -r _key repository tag; do
        name=${repository##*/}
        if ! shown "$name" || ! standin "$name"; then continue; fi
        image "$name" "$repository" "$tag" "$(echo "$standin_digest $tag" | digest)" \
            build_standin_sidecar "/$name" "$tag"
    done <<<"$sidecars"
fi
if needed zerofs-standin; then
    server_digest=$(server_inputs)
    image zerofs-standin "$SERVER_REPOSITORY" "${server_digest:0:12}" "$server_digest" build_server
fi
if needed zerofs; then
    zerofs_version=$("$zerofs" --version | awk '{ print $2 }')
    [[ -n $zerofs_version ]] || fail "$zerofs --version printed no version"
    zerofs_digest=$(zerofs_inputs "$zerofs")
    image zerofs "$ZEROFS_REPOSITORY" "$zerofs_version-${zerofs_digest:0:12}" "$zerofs_digest" \
        build_zerofs "$zerofs"
fi

((${#lines[@]} == 0)) || printf '%s\n' "${lines[@]}"
