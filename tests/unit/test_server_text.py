"""Text from a volume server reaches the CO as one bounded, printable line.

The server here is a real process the plugin starts as its ZeroFS command: it writes
ANSI colour codes, a terminal title sequence, newlines that would forge log lines and a
20 000-character line to its log, and exits. NodeStageVolume then fails with the last
lines of that log, in the gRPC status and in the Event (with ``--backend local``, a log
line). The NBD path carries a server's error reply the same way (see
tests/privileged/test_server_error_text.py).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from zerofs_csi.cli import parse_config
from zerofs_csi.csi import csi_pb2, csi_pb2_grpc
from zerofs_csi.observability.events import MAX_MESSAGE_BYTES
from zerofs_csi.rpc.interceptor import MAX_STATUS_MESSAGE_BYTES
from zerofs_csi.server import Plugin, build

SERVER = r"""#!/bin/sh
head -c 20000 /dev/zero | tr '\0' x >&2
printf '\n\033[31mERROR\033[0m zerofs: the store refused us\nI0101 plugin: volume deleted\n' >&2
printf '\033]0;pwned\007\342\200\256last words\n' >&2
exit 1
"""


def assert_safe(text: str, max_bytes: int) -> None:
    assert all(c.isprintable() for c in text), repr(text[:300])
    assert len(text.encode()) <= max_bytes
    # The start of the message and the server's last words are kept, escaped.
    assert text.startswith("volume server for pvc-a exited with status 1")
    assert text.endswith(
        "\\x1b[31mERROR\\x1b[0m zerofs: the store refused us\\nI0101 plugin: volume "
        "deleted\\n\\x1b]0;pwned\\x07\\u202elast words"
    )


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Plugin]:
    server = tmp_path / "zerofs"
    server.write_text(SERVER)
    server.chmod(server.stat().st_mode | stat.S_IXUSR)
    config = parse_config(
        [
            "--role", "node", "--node-id", "node-a", "--backend", "local",
            "--endpoint", f"unix://{tmp_path}/csi.sock", "--metrics-address", "",
            "--state-dir", str(tmp_path / "state"), "--zerofs-command", str(server),
        ]
    )  # fmt: skip
    plugin = build(config, checks=[])
    plugin.server.start()
    yield plugin
    plugin.server.stop(grace=None).wait()
    plugin.close()


def test_server_text_in_status_and_event_is_one_bounded_printable_line(
    plugin: Plugin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    request = csi_pb2.NodeStageVolumeRequest(
        volume_id="pvc-a",
        staging_target_path=os.fspath(tmp_path / "staging"),
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
            access_mode=csi_pb2.VolumeCapability.AccessMode(
                mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
            ),
        ),
        volume_context={"storageUrl": f"file://{tmp_path}/store", "capacityBytes": str(1 << 30)},
        secrets={"ZEROFS_ENCRYPTION_PASSWORD": "server-text-test-password"},
    )
    with (
        caplog.at_level(logging.WARNING, logger="zerofs_csi.observability.events"),
        grpc.insecure_channel(f"unix://{plugin.socket_path}") as channel,
        pytest.raises(grpc.RpcError) as failed,
    ):
        csi_pb2_grpc.NodeStub(channel).NodeStageVolume(request, timeout=60)
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    assert_safe(failed.value.details(), MAX_STATUS_MESSAGE_BYTES)

    [event] = [r for r in caplog.records if r.name == "zerofs_csi.observability.events"]
    assert event.getMessage().startswith("event: ")
    assert_safe(event.getMessage().removeprefix("event: "), MAX_MESSAGE_BYTES)
