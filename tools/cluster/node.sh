#!/usr/bin/env bash
# The test cluster's node, run as the microVM's command (tools/cluster/cluster.py):
# containerd with the images of make cluster-images, kubelet and kube-proxy, registered
# with the API server on the host through the VM's forward; writes RUN_DIR/node-ready
# once the node is Ready and stops everything when RUN_DIR/stop appears. The guest's
# root is the host's, read-only: the node's state lives in tmpfs (/var/lib, /run), so
# every run starts from an empty node.
# Usage: node.sh RUN_DIR   (RUN_DIR: written by cluster.py; node.env in it)
set -euo pipefail
run_dir=$1
# The microVM's own settings (KERNEL_TREE: the guest kernel's modules).
vm_run_dir=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^zerofs_vm.run=//p')
# shellcheck source=/dev/null
source "$vm_run_dir/guest.conf"
# shellcheck source=/dev/null
source "$run_dir/node.env"
export PATH=$BINARIES:$PATH
logs=$run_dir/logs
mkdir -p "$logs"

fail() {
    echo "node.sh: $*" >&2
    exit 1
}

pids=()
stop_all() {
    local pid
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        pid=${pids[i]}
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_all EXIT

# Starts a component in the background, its output in $logs/NAME.log.
start() { # NAME ARGS...
    local name=$1
    shift
    "$@" >"$logs/$name.log" 2>&1 &
    pids+=($!)
}

alive() { # NAME PID
    kill -0 "$2" 2>/dev/null || { tail -20 "$logs/$1.log" >&2; fail "$1 exited; its log: $logs/$1.log"; }
}

phase() { echo "node.sh: $(cut -d' ' -f1 /proc/uptime) s $*"; }

# kubelet and the runtime need the unified cgroup hierarchy with its controllers
# delegated, shared mount propagation (the CSI plugin's mounts reach the pods), and a
# writable /var/lib.
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 cgroup2 /sys/fs/cgroup
echo "+cpu +memory +pids +io +cpuset" >/sys/fs/cgroup/cgroup.subtree_control
mount --make-rshared /
modprobe=/run/guest-modprobe
mount -t tmpfs -o mode=755 tmpfs /var/lib
mkdir -p /var/lib/kubelet /var/lib/containerd /run/containerd /run/cni/net.d
# The node disk (cluster.py --disk, /dev/vda): containerd's images between runs.
# shellcheck source=tools/cluster/node_disk.sh
source "$(dirname "${BASH_SOURCE[0]}")/node_disk.sh"
# Every container stopped and containerd with it, then the disk released.
release_node_disk() {
    command kill "$kubelet_pid" "$kube_proxy_pid" 2>/dev/null || true
    wait "$kubelet_pid" "$kube_proxy_pid" 2>/dev/null || true
    "${ctr[@]}" tasks ls -q | xargs -r "${ctr[@]}" tasks delete --force >/dev/null 2>&1 || true
    stop_all
    node_disk_release "$NODE_DISK" /var/lib/containerd || true
}
if [[ -n ${NODE_DISK-} ]]; then
    "$modprobe" virtio_blk || fail "cannot load virtio_blk"
    for _ in $(seq 100); do
        [[ -b $NODE_DISK ]] && break
        sleep 0.1
    done
    [[ -b $NODE_DISK ]] || fail "no $NODE_DISK"
    node_disk_mount "$NODE_DISK" /var/lib/containerd || fail "cannot use the node disk $NODE_DISK"
fi
# A node has its kernel's modules in /lib/modules (the chart's nbd init container mounts
# it); the host root has none, so an overlay on /usr/lib adds them.
if [[ ! -d /lib/modules/$(uname -r) ]]; then
    mkdir -p /run/usr-lib/upper /run/usr-lib/work
    mount -t overlay overlay \
        -o lowerdir=/usr/lib,upperdir=/run/usr-lib/upper,workdir=/run/usr-lib/work /usr/lib
    mkdir -p "/lib/modules/$(uname -r)"
    mount --bind "$KERNEL_TREE/lib/modules/$(uname -r)" "/lib/modules/$(uname -r)"
fi
# loop: kubelet maps a raw block volume into a pod through a loop device of its own.
for module in overlay br_netfilter bridge veth nf_conntrack iptable_nat iptable_filter \
    xt_MASQUERADE xt_comment xt_mark xt_conntrack xt_addrtype nf_nat loop; do
    "$modprobe" "$module" || fail "cannot load the $module module"
done
sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 \
    net.ipv4.conf.all.route_localnet=1
phase "kernel ready"

# Pods on one bridge, masqueraded when they leave it (the API server and S3 are on the
# host, behind the VM's forwards).
cat >/run/cni/net.d/10-zerofs-test.conflist <<JSON
{
  "cniVersion": "1.0.0",
  "name": "zerofs-test",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$NODE_POD_CIDR"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON

cat >/run/containerd/config.toml <<TOML
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["$BINARIES/cni"]
  conf_dir = "/run/cni/net.d"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = "$BINARIES/runc"
TOML
start containerd containerd --config /run/containerd/config.toml
containerd_pid=${pids[-1]}
for _ in $(seq 600); do
    [[ -S /run/containerd/containerd.sock ]] && break
    alive containerd "$containerd_pid"
    sleep 0.1
done
[[ -S /run/containerd/containerd.sock ]] || fail "containerd did not open its socket"
phase "containerd up"

# containerd's client on the CRI's namespace, also for xargs (an array, not a function).
ctr=(ctr --address /run/containerd/containerd.sock -n k8s.io)
# Nothing of an earlier run but its images: containers left by a run that was cut off go.
"${ctr[@]}" containers ls -q | xargs -r "${ctr[@]}" containers rm >/dev/null 2>&1 || true
# Every image the cluster runs, from the archives of make cluster-images; with the node
# disk, an archive imported by an earlier run (same name, size and time) is there already,
# and an image no archive names any more is removed.
imported=/var/lib/containerd/zerofs-imported.txt
touch "$imported"
wanted=()
present=" $("${ctr[@]}" images ls -q | tr '\n' ' ') "
while read -r archive repository; do
    [[ -n $archive ]] || continue
    # <last part of the repository>-<tag>.tar, and a tag may hold dashes.
    tag=${archive##*/}
    tag=${tag#"${repository##*/}-"}
    wanted+=("$repository:${tag%.tar}")
    key="$(basename "$archive") $(stat -c '%s %Y' "$archive")"
    # Imported by an earlier run, and not removed since.
    grep -qxF "$key" "$imported" && [[ $present == *" ${wanted[-1]} "* ]] && continue
    "${ctr[@]}" images import --base-name "$repository" "$archive" >/dev/null \
        || fail "cannot import $archive"
    echo "$key" >>"$imported"
done <"$run_dir/images.txt"
for image in $("${ctr[@]}" images ls -q); do
    [[ " ${wanted[*]} " == *" $image "* ]] || "${ctr[@]}" images rm "$image" >/dev/null
done
phase "images imported"

cat >/run/kubelet-config.yaml <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$CA_FILE"}
authorization: {mode: Webhook}
tlsCertFile: "$KUBELET_TLS_CERT"
tlsPrivateKeyFile: "$KUBELET_TLS_KEY"
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
failSwapOn: false
resolvConf: /etc/resolv.conf
# The node's disk is memory: no eviction on its size, and images are never collected.
evictionHard: {memory.available: "100Mi"}
imageGCHighThresholdPercent: 100
imageMinimumGCAge: 876000h
serializeImagePulls: false
# Under TCG the CSI sidecars' one-second start-up checks time out while every pod starts
# at once; a container that exited is restarted within 10 s instead of backing off for
# minutes (KubeletCrashLoopBackOffMax, on by default since 1.35).
crashLoopBackOff: {maxContainerRestartPeriod: 10s}
volumePluginDir: /var/lib/kubelet/volume-plugins
registerNode: true
YAML
start kubelet kubelet --config=/run/kubelet-config.yaml --kubeconfig="$KUBELET_KUBECONFIG" \
    --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --root-dir=/var/lib/kubelet
kubelet_pid=${pids[-1]}

cat >/run/kube-proxy-config.yaml <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: "$KUBE_PROXY_KUBECONFIG"}
mode: iptables
clusterCIDR: "$POD_CIDR"
hostnameOverride: "$NODE_NAME"
conntrack: {maxPerCore: 0}
YAML
start kube-proxy kube-proxy --config=/run/kube-proxy-config.yaml
kube_proxy_pid=${pids[-1]}

kubectl() { command kubectl --kubeconfig "$ADMIN_KUBECONFIG" --request-timeout=20s "$@"; }
node_ready() {
    [[ $(kubectl get node "$NODE_NAME" \
        -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}
uptime_s() { cut -d. -f1 /proc/uptime; }
# Bounded by the guest's clock, not by a count: a call that hangs must not stretch it.
ready_by=$(($(uptime_s) + 600))
until node_ready; do
    alive kubelet "$kubelet_pid"
    alive kube-proxy "$kube_proxy_pid"
    if (($(uptime_s) > ready_by)); then
        tail -20 "$logs/kubelet.log" >&2
        fail "node $NODE_NAME not Ready after 10 min; logs: $logs/kubelet.log"
    fi
    sleep 1
done
phase "node $NODE_NAME Ready"
echo ready >"$run_dir/node-ready"
while [[ ! -e $run_dir/stop ]]; do
    alive kubelet "$kubelet_pid"
    sleep 2
done
phase "stopping"
if [[ -n ${NODE_DISK-} ]]; then
    release_node_disk
else
    stop_all
fi
trap - EXIT
phase "stopped"
