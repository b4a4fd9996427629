"""Events posted to the API server: a server's text becomes one printable line of at
most the 1 KiB the API server accepts, secrets masked."""

from __future__ import annotations

from typing import Any

from kubernetes import client

from kube.cluster import Cluster
from zerofs_csi.kube.api import call_json
from zerofs_csi.observability.events import MAX_MESSAGE_BYTES, KubernetesEventRecorder
from zerofs_csi.observability.sanitize import REDACTOR
from zerofs_csi.volume.context import PVC_NAME_KEY, PVC_NAMESPACE_KEY

SECRET = "evt-Secret-never-posted"


def events_about(admin: client.ApiClient, namespace: str, claim: str) -> list[dict[str, Any]]:
    listing = call_json(client.CoreV1Api(admin).list_namespaced_event, namespace)
    return [e for e in listing["items"] if e["involvedObject"].get("name") == claim]


def test_server_text_in_an_event_is_one_printable_line(
    cluster: Cluster, admin: client.ApiClient
) -> None:
    REDACTOR.remember([SECRET])
    server_reply = (
        "\x1b[31mdenied\x1b[0m\nNormal  Attached  volume is fine\r\n"
        + "ä" * 2000
        + f" {SECRET} last words\u202e"
    )
    recorder = KubernetesEventRecorder(client.CoreV1Api(admin), "zerofs-csi-node", "node-a")
    context = {PVC_NAME_KEY: "data", PVC_NAMESPACE_KEY: cluster.namespace}
    recorder.warning(
        "pvc-a",
        "VolumeServerNotReady",
        f"attaching export pvc-a: NBD server refused it: {server_reply}",
        context,
    )

    [event] = events_about(admin, cluster.namespace, "data")
    message = event["message"]
    assert all(c.isprintable() for c in message), repr(message[:300])
    assert len(message.encode()) <= MAX_MESSAGE_BYTES
    assert message.startswith(
        "attaching export pvc-a: NBD server refused it: \\x1b[31mdenied\\x1b[0m\\n"
        "Normal  Attached  volume is fine\\r\\n"
    )
    assert message.endswith("ä ***stripped*** last words\\u202e")
