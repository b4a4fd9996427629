"""Restores on the Kubernetes backend: a new volume filled from a checkpoint by a restore
pod (``job_pods.restore_job``), followed across CreateVolume's retries by ``KubeJobs``.

While the pod runs, CreateVolume answers UNAVAILABLE (``JobInProgress``, which the
external-provisioner retries with the same name) with the pod's state and the copy's
progress, read from the copy's ``progress N`` lines in the job container's log and
reported to the copy-progress gauge. Once the pod succeeded the CreateVolume goes on to
record the volume; a failed copy answers with its own code (OUT_OF_RANGE, ...). A pod of
another request for the same new volume (another source or capacity) is replaced.
DeleteVolume of the new volume removes a restore pod left behind
(``KubeCheckpoints.remove_jobs``).
"""

from __future__ import annotations

from collections.abc import Mapping

from zerofs_csi.controller.checkpoints import (
    CheckpointSource,
    CopyProgress,
    JobInProgress,
    no_progress,
    progress_reporter,
    volume_secrets,
)
from zerofs_csi.controller.job_pods_kube import KubeJobs
from zerofs_csi.servers.pods import job_pods
from zerofs_csi.servers.pods.restore_copy import progress_of
from zerofs_csi.volume.settings import parse_volume_settings

LOG_TAIL_LINES = 5


class KubeRestores:
    """Fills new volumes through restore pods run by ``jobs``; ``copy_progress`` is told
    each progress read."""

    def __init__(self, jobs: KubeJobs, copy_progress: CopyProgress = no_progress) -> None:
        self._jobs = jobs
        self._copy_progress = copy_progress

    def fill(
        self,
        source: CheckpointSource,
        volume_id: str,
        parameters: Mapping[str, str],
        capacity_bytes: int,
        csi_secrets: Mapping[str, str],
    ) -> None:
        """One step of the restore: returns once the new volume holds the source's
        data; JobInProgress while it is copied."""
        job = job_pods.restore_job(
            volume_id,
            parse_volume_settings(parameters),
            capacity_bytes,
            source.volume_id,
            parse_volume_settings(source.parameters),
            source.checkpoint,
            volume_secrets(volume_id, csi_secrets),
        )
        report = progress_reporter(volume_id, self._copy_progress)

        def progress(pod: str) -> str:
            lines = self._jobs.log_tail(pod, LOG_TAIL_LINES).splitlines()
            found = [progress_of(line) for line in lines]
            known = [percent for percent in found if percent is not None]
            if not known:
                return ""
            report(known[-1])
            return f"{known[-1]}% copied"

        read = (
            f"checkpoint {source.checkpoint!r} of volume {source.volume_id}"
            if source.checkpoint is not None
            else f"volume {source.volume_id} (staged nowhere)"
        )
        what = f"restore of volume {volume_id} from {read}"
        try:
            self._jobs.run(job, what, preempt=True, while_running=progress)
        except JobInProgress:
            raise
        except BaseException:
            self._copy_progress(volume_id, None)
            raise
        self._copy_progress(volume_id, None)
