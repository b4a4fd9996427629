"""Manifests of a volume's Kubernetes objects: the config Secret and the ZeroFS pod.

Pure functions from typed inputs to API-shaped dicts (camelCase keys, as the API
server and the ``kubernetes`` client accept them), so they can be checked without a
cluster.

Choices, and why:

- Sockets: the volume's socket directory ``<socket root>/<volume id>`` is a hostPath
  mounted at the same path in the ZeroFS container, so the paths in the config file,
  the ones the node plugin connects to and the ones the readiness probe checks are one
  and the same. The node plugin creates the directory (owned by the ZeroFS user)
  before the pod, so the hostPath type is ``Directory``: a plugin whose socket root is
  not really on the host makes the pod fail to start with a clear mount event instead
  of serving sockets nobody sees.
- Secrets: ``config.toml`` holds ``${VAR}`` placeholders only (see zerofs_config); the
  values are keys of the same Secret, handed to the container with ``secretKeyRef``.
  Nothing secret is in the pod spec.
- Readiness: the probe connects to both sockets and checks that the servers answer: the
  NBD newstyle greeting, then an NBD_OPT_ABORT so the server ends the session cleanly,
  and a 9P Tversion answered by Rversion. A socket file can outlive its server (ZeroFS
  killed, or a stale file), so ``test -S`` would report a dead server ready. The image
  (Debian slim with the zerofs binary) has perl-base, which is Essential in Debian and
  includes IO::Socket::UNIX; it has no python, socat or nc.
- No liveness probe: a restart of ZeroFS breaks the NBD connections of mounted
  filesystems, so a slow server must not be killed by a probe.
- A fence guard runs ZeroFS (``FENCE_GUARD_SCRIPT``, in perl as the probe): ZeroFS
  exits 1 for a fenced write as for any fatal write error, and kubelet restarts the
  container (``restartPolicy: Always``). Restarted, a fenced ZeroFS would open the
  volume again and fence the newer writer on another node in turn, the two taking the
  volume from each other. The guard passes ZeroFS's output on unchanged, forwards
  SIGTERM and SIGINT to it (its final flush) and exits with its status; when the output
  carried SlateDB's fencing message it leaves ``base.FENCED_FILE`` in the socket
  directory, and started with that file there it does not start ZeroFS but waits, not
  ready, until the node plugin replaces the pod (the backend does so at the next
  NodeStage here, the CO giving the volume back).
- Owner: a reference to the node DaemonSet with ``controller: false``. A controller
  reference from a DaemonSet to a pod its selector does not match is released by the
  DaemonSet controller (pkg/controller/controller_ref_manager.go, ClaimObject), and a
  pod its selector does match would be counted as a daemon pod and deleted as surplus;
  a plain owner reference keeps garbage collection on DaemonSet deletion and is
  ignored by the controller. The labels below must not match the DaemonSet's selector
  (checked by ``owner.resolve_daemonset_owner``).
- ``file://`` storage (single-node and test setups): the directory is a hostPath of
  type ``Directory`` mounted at the same path, so the pod's ZeroFS writes where the
  local backend would. It must exist on the node and be writable by uid 1001.
- Envoy (optional): a native sidecar (an init container with ``restartPolicy:
  Always``, Kubernetes 1.29+), started before ZeroFS and stopped after it. WARNING:
  retries by a proxy in front of the object store can replay a conditional put after
  the store applied it, which breaks ZeroFS's fencing (the epoch check that keeps two
  writers apart). Disable retries for PUTs in the Envoy config if you enable it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from zerofs_csi import DRIVER_NAME
from zerofs_csi.servers.base import FENCED_MARKER, ServerSockets
from zerofs_csi.servers.zerofs_config import RenderedConfig
from zerofs_csi.volume.settings import VolumeSettings

Manifest = dict[str, Any]

POD_NAME_PREFIX = "zerofs-volume-"
SECRET_NAME_PREFIX = "zerofs-config-"

LABEL_VOLUME = f"{DRIVER_NAME}/volume"
LABEL_NODE = f"{DRIVER_NAME}/node"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "zerofs-csi"
COMPONENT = "volume-server"
# Every per-volume object of this driver carries these (and the volume label).
COMMON_LABELS: Mapping[str, str] = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: COMPONENT}
SERVER_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_COMPONENT}={COMPONENT}"

ANNOTATION_CONFIG_HASH = f"{DRIVER_NAME}/config-hash"
ANNOTATION_CONFIG_SECRET = f"{DRIVER_NAME}/config-secret-version"

CONFIG_KEY = "config.toml"
CONFIG_DIR = "/etc/zerofs"
CACHE_DIR = "/var/cache/zerofs"
ENVOY_CONFIG_DIR = "/etc/envoy"
ENVOY_CONFIG_KEY = "envoy.yaml"
CONTAINER_NAME = "zerofs"

# The user of the ghcr.io/barre/zerofs image (its Dockerfile: useradd -u 1001 zerofs).
ZEROFS_UID = 1001
# ZeroFS flushes its open segment and metadata to the object store on SIGTERM.
TERMINATION_GRACE_SECONDS = 60
# ZeroFS's disk cache may briefly exceed its configured size; the emptyDir limit gets
# this much headroom so that the kubelet does not evict the pod for it.
CACHE_SIZE_HEADROOM = 1.25
READINESS_PERIOD_SECONDS = 2
READINESS_TIMEOUT_SECONDS = 5

# Arguments: NBD socket path, 9P socket path. Exit 0 only if both servers answered.
# NBD: server greeting "NBDMAGIC" "IHAVEOPT" + 16-bit flags; client flags
# FIXED_NEWSTYLE|NO_ZEROES (1|2); option header "IHAVEOPT", NBD_OPT_ABORT (2), length 0
# (NBD protocol.md, "Newstyle negotiation"). 9P: size[4] Tversion(100) tag[2]=NOTAG
# msize[4] version[s], little-endian; the answer is Rversion (101) (9P2000 version(5)).
READINESS_SCRIPT = r"""
use strict;
use IO::Socket::UNIX;
my $stage = "NBD";
$SIG{ALRM} = sub { die "$stage server: no answer in time\n" };
alarm 4;
sub take { my ($s, $n, $what) = @_; my $b = "";
  while (length($b) < $n) { sysread($s, $b, $n - length($b), length($b)) or die "$what closed\n"; }
  return $b; }
my $nbd = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die "NBD socket $ARGV[0]: $!\n";
take($nbd, 18, "NBD") =~ /^NBDMAGICIHAVEOPT/ or die "NBD greeting expected\n";
syswrite($nbd, pack("N", 3) . "IHAVEOPT" . pack("NN", 2, 0));
close($nbd);
$stage = "9P";
my $p9 = IO::Socket::UNIX->new(Peer => $ARGV[1]) or die "9P socket $ARGV[1]: $!\n";
my $msg = pack("CvVv", 100, 0xFFFF, 8192, 8) . "9P2000.L";
syswrite($p9, pack("V", 4 + length($msg)) . $msg);
my (undef, $type) = unpack("VC", take($p9, 5, "9P"));
$type == 101 or die "9P answered type $type, not Rversion\n";
""".strip()


# Arguments: the fencing message, the guard file, the lives file (``servers.lives``),
# then ZeroFS's argv. Output goes through line by line; a signal handler's interrupted
# read is retried by perl.
FENCE_GUARD_SCRIPT = r"""
use strict;
my ($marker, $guard, $lives, @server) = @ARGV;
$| = 1;
sub life {
  my $file;
  if (open($file, ">>", $lives)) { printf $file "%s %d%s\n", $_[0], time(), $_[1]; close($file); }
  else { print STDERR "zerofs-csi: cannot record the server's $_[0] in $lives: $!\n"; }
}
if (-e $guard) {
  print STDERR "zerofs-csi: this server was fenced by a newer writer of the volume; "
    . "not starting it again until the node plugin replaces its pod\n";
  # As the container's first process a signal without a handler is ignored.
  $SIG{$_} = sub { exit 0 } for qw(TERM INT);
  sleep 3600 while 1;
}
pipe(my $output, my $input) or die "pipe: $!\n";
life("start", "");
my $pid = fork();
defined $pid or die "fork: $!\n";
if ($pid == 0) {
  close $output;
  open(STDOUT, ">&", $input) and open(STDERR, ">&", $input) or die "dup: $!\n";
  exec { $server[0] } @server or die "cannot run $server[0]: $!\n";
}
close $input;
$SIG{$_} = sub { kill $_[0], $pid } for qw(TERM INT);
my $fenced = 0;
while (my $line = <$output>) {
  print $line;
  $fenced = 1 if index($line, $marker) >= 0;
}
1 while waitpid($pid, 0) == -1 && $!{EINTR};
my $status = $?;
my $code = ($status & 127) ? 128 + ($status & 127) : $status >> 8;
life("exit", " $code");
if ($fenced) {
  if (open(my $mark, ">", $guard)) { close($mark); }
  else { print STDERR "zerofs-csi: cannot leave the fenced mark $guard: $!\n"; }
}
exit($code);
""".strip()


def guarded_command(sockets: ServerSockets) -> list[str]:
    """The container's command: ZeroFS (the image's ``zerofs``) under the fence guard;
    the container's args are ZeroFS's."""
    return [
        "perl",
        "-e",
        FENCE_GUARD_SCRIPT,
        FENCED_MARKER,
        str(sockets.fenced),
        str(sockets.lives),
        "zerofs",
    ]


def pod_name(volume_id: str) -> str:
    return POD_NAME_PREFIX + volume_id


def secret_name(volume_id: str) -> str:
    return SECRET_NAME_PREFIX + volume_id


def volume_selector(volume_id: str) -> str:
    """Label selector of every server object of one volume (on any node)."""
    return f"{SERVER_SELECTOR},{LABEL_VOLUME}={volume_id}"


def is_label_value(text: str) -> bool:
    """Whether ``text`` is a valid label value (Kubernetes IsValidLabelValue)."""
    if len(text) > 63:
        return False
    if not text:
        return True
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return text[0].isalnum() and text[-1].isalnum() and set(text) <= allowed


def volume_labels(volume_id: str, node_name: str | None) -> dict[str, str]:
    labels = {**COMMON_LABELS, LABEL_VOLUME: volume_id}
    # A node name can be a 253-character DNS subdomain; the label is informational
    # (lookups by node use the spec.nodeName field selector), so long names skip it.
    if node_name and is_label_value(node_name):
        labels[LABEL_NODE] = node_name
    return labels


def daemonset_owner_reference(name: str, uid: str) -> Manifest:
    """An apps/v1 owner reference to the node DaemonSet (not a controller reference)."""
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "name": name,
        "uid": uid,
        "controller": False,
        "blockOwnerDeletion": True,
    }


def encode_data(values: Mapping[str, str]) -> dict[str, str]:
    """A Secret's ``data``: each value base64-encoded UTF-8."""
    return {key: base64.b64encode(value.encode()).decode("ascii") for key, value in values.items()}


def config_secret(
    *,
    volume_id: str,
    namespace: str,
    rendered: RenderedConfig,
    owner: Manifest | None,
) -> Manifest:
    """Secret ``zerofs-config-<volume>``: config.toml and the values of its placeholders."""
    if CONFIG_KEY in rendered.secret_env:
        raise ValueError(f"secret environment variable may not be named {CONFIG_KEY}")
    metadata: Manifest = {
        "name": secret_name(volume_id),
        "namespace": namespace,
        "labels": volume_labels(volume_id, None),
    }
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "data": encode_data({CONFIG_KEY: rendered.toml_text, **rendered.secret_env}),
    }


def cache_size_limit(settings: VolumeSettings) -> str:
    return str(math.ceil(settings.cache_disk_size_gb * 1e9 * CACHE_SIZE_HEADROOM))


def security_context() -> Manifest:
    return {
        "runAsUser": ZEROFS_UID,
        "runAsGroup": ZEROFS_UID,
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def readiness_command(sockets: ServerSockets) -> list[str]:
    return ["perl", "-e", READINESS_SCRIPT, str(sockets.nbd), str(sockets.ninep)]


def volume_pod(
    *,
    volume_id: str,
    namespace: str,
    node_name: str,
    settings: VolumeSettings,
    sockets: ServerSockets,
    secret_env_names: Iterable[str],
    secret_version: str,
    config_text: str,
    owner: Manifest | None,
) -> Manifest:
    """Pod ``zerofs-volume-<volume>`` pinned to ``node_name``.

    ``secret_version`` identifies the content of the config Secret (its uid and
    resourceVersion) and ``config_text`` is the rendered config; both go into the
    config hash annotation, so a pod started from other settings, another config or
    other secret values is recognised as stale without hashing any secret.
    """
    env: list[Manifest] = [{"name": "RUST_LOG", "value": settings.rust_log}]
    env += [
        {
            "name": name,
            "valueFrom": {"secretKeyRef": {"name": secret_name(volume_id), "key": name}},
        }
        for name in sorted(secret_env_names)
    ]
    volumes: list[Manifest] = [
        {
            "name": "config",
            "secret": {
                "secretName": secret_name(volume_id),
                "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}],
                "defaultMode": 0o440,
            },
        },
        {
            "name": "sockets",
            "hostPath": {"path": str(sockets.directory), "type": "Directory"},
        },
        {"name": "cache", "emptyDir": {"sizeLimit": cache_size_limit(settings)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": "IfNotPresent",
        "command": guarded_command(sockets),
        "args": [
            "run",
            "--config",
            f"{CONFIG_DIR}/{CONFIG_KEY}",
            *(["--read-only"] if settings.read_only_server else []),
        ],  # fmt: skip
        "env": env,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "sockets", "mountPath": str(sockets.directory)},
            {"name": "cache", "mountPath": CACHE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "readinessProbe": {
            "exec": {"command": readiness_command(sockets)},
            "periodSeconds": READINESS_PERIOD_SECONDS,
            "timeoutSeconds": READINESS_TIMEOUT_SECONDS,
            "failureThreshold": 3,
        },
        "securityContext": security_context(),
    }
    if settings.storage_url.scheme == "file":
        storage_dir = "/" + settings.storage_url.path
        volumes.append({"name": "storage", "hostPath": {"path": storage_dir, "type": "Directory"}})
        container["volumeMounts"].append({"name": "storage", "mountPath": storage_dir})
    resources = settings.resources()
    if resources:
        container["resources"] = resources
    spec: Manifest = {
        "nodeName": node_name,
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        # Like the node DaemonSet, run on whatever taints the node carries: the
        # volume is mounted there.
        "tolerations": [{"operator": "Exists"}],
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"fsGroup": ZEROFS_UID},
        "containers": [container],
        "volumes": volumes,
    }
    if settings.envoy_enabled:
        spec["initContainers"] = [_envoy_sidecar(settings)]
        volumes.append(
            {"name": "envoy-config", "configMap": {"name": settings.envoy_config_map_name}}
        )
    annotations = {ANNOTATION_CONFIG_SECRET: secret_version}
    metadata: Manifest = {
        "name": pod_name(volume_id),
        "namespace": namespace,
        "labels": volume_labels(volume_id, node_name),
        "annotations": annotations,
    }
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    pod: Manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}
    annotations[ANNOTATION_CONFIG_HASH] = config_hash(pod, config_text)
    return pod


def _envoy_sidecar(settings: VolumeSettings) -> Manifest:
    return {
        "name": "envoy",
        "image": settings.envoy_image,
        "imagePullPolicy": "IfNotPresent",
        # A native sidecar: runs for the pod's lifetime, before and after ZeroFS.
        "restartPolicy": "Always",
        "args": ["--config-path", f"{ENVOY_CONFIG_DIR}/{ENVOY_CONFIG_KEY}", "--log-level", "warn"],
        "volumeMounts": [
            {"name": "envoy-config", "mountPath": ENVOY_CONFIG_DIR, "readOnly": True},
        ],
        "securityContext": security_context(),
    }


def config_hash(pod: Manifest, config_text: str) -> str:
    """A digest of everything that defines a server: the pod manifest (without this
    annotation) and the config text. Neither holds a secret value."""
    clean = json.loads(json.dumps(pod))
    clean["metadata"].get("annotations", {}).pop(ANNOTATION_CONFIG_HASH, None)
    digest = hashlib.sha256()
    digest.update(json.dumps(clean, sort_keys=True, separators=(",", ":")).encode())
    digest.update(b"\0")
    digest.update(config_text.encode())
    return digest.hexdigest()[:32]


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels, matchExpressions) selects ``labels``.

    An empty selector matches everything, as in the API's LabelSelectorAsSelector.
    """
    if not selector:
        return True
    match_labels: Mapping[str, str] = selector.get("matchLabels") or {}
    for key, value in match_labels.items():
        if labels.get(key) != value:
            return False
    expressions: Sequence[Mapping[str, Any]] = selector.get("matchExpressions") or []
    for expression in expressions:
        key, operator = expression["key"], expression["operator"]
        values = set(expression.get("values") or [])
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True
