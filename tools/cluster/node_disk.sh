#!/usr/bin/env bash
# The test cluster's node disk (cluster.py --disk): containerd's images kept between runs,
# so that only new or changed images are unpacked. A disk is used as it is only when it
# checks clean and the run that last used it released it: a run cut off (its VM killed
# at a timeout, or paused by a full host disk) leaves files its kernel never wrote back,
# such as an image's binary with no content at all. Any other disk is made anew.
#
# Sourced by node.sh; also a command, for the tests:
#   node_disk.sh mount DEVICE DIR     the disk on DIR, marked in use
#   node_disk.sh release DEVICE DIR   unmounted (whatever used it stopped), marked released
set -euo pipefail

# Written by the release and removed, written back, by the mount: a disk without it was
# not released (or by a node.sh from before this mark, which kept no such promise).
NODE_DISK_RELEASED=zerofs-node-released

node_disk_mount() { # DEVICE DIR
    local device=$1 dir=$2
    if e2fsck -p "$device" >/dev/null 2>&1 && mount "$device" "$dir"; then
        if [[ -e $dir/$NODE_DISK_RELEASED ]]; then
            rm "$dir/$NODE_DISK_RELEASED"
            sync -f "$dir"
            return 0
        fi
        echo "node_disk: the run that last used $device did not release it; made anew" >&2
        umount "$dir"
    fi
    mkfs.ext4 -q -F "$device" || { echo "node_disk: cannot make a filesystem on $device" >&2; return 1; }
    mount "$device" "$dir" || { echo "node_disk: cannot mount $device" >&2; return 1; }
}

# Released only once unmounted, which writes everything back: the mark goes in a mount
# of its own after that, so a run cut off at any point leaves the disk unreleased.
node_disk_release() { # DEVICE DIR
    local device=$1 dir=$2
    if ! umount -R "$dir"; then
        umount -l "$dir"
        echo "node_disk: $device was still in use at the end; the next run makes it anew" >&2
        return 1
    fi
    mount "$device" "$dir"
    touch "$dir/$NODE_DISK_RELEASED"
    umount "$dir"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    case ${1-} in
    mount) node_disk_mount "$2" "$3" ;;
    release) node_disk_release "$2" "$3" ;;
    *)
        echo "usage: $0 mount|release DEVICE DIR" >&2
        exit 2
        ;;
    esac
fi
