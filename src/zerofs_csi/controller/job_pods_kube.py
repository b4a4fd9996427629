"""Job pods followed across a CSI call's retries (Kubernetes backend): a restore or a
checkpoint of a volume staged nowhere takes longer than one call may wait, so each call
is a step of a state machine kept in the API server, the job pod (``job_pods``) being
the state:

- no pod: create it, then its Secret (owned by the pod);
- a pod of another job (its ``job-hash`` annotation differs): when it has ended, or when
  the job may preempt it, delete it; answer retry either way (``JobInProgress``);
- a pod being deleted: answer retry until it is gone;
- Pending or Running: answer retry, saying what it waits for;
- Succeeded: delete the pod and its Secret, return the job container's termination
  message;
- Failed: delete them, raise the job's error (``CODE: message``), or INTERNAL with the
  pod's reason; the next call starts over.

Each call waits a short while for the pod to end before answering retry, and marks the
pod as stepped (its ``last-step`` annotation, at most once a minute). A pod no call has
stepped for a while was given up by its caller (a claim or snapshot deleted while its job
ran: the CSI sidecars retry every five minutes at most), and ``idle`` lists it for a
sweep.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime

from kubernetes import client

from zerofs_csi import errors
from zerofs_csi.controller.checkpoints import JobInProgress
from zerofs_csi.kube.api import Obj, api_failure, call_json, is_status
from zerofs_csi.servers.pods import job_pods, objects

log = logging.getLogger(__name__)

DEFAULT_WAIT_SECONDS = 20.0
POLL_INTERVAL_SECONDS = 0.5
# How many of a failed job's last log lines its error quotes.
FAILURE_LOG_LINES = 3
# A step refreshes the pod's last-step annotation when it is older than this.
STEP_MARK_INTERVAL_SECONDS = 60.0
JOB_PODS_SELECTOR = (
    f"{objects.LABEL_MANAGED_BY}={objects.MANAGED_BY},"
    f"{objects.LABEL_COMPONENT}={job_pods.COMPONENT}"
)


def _job_hash(pod: Obj) -> str | None:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return annotations.get(job_pods.ANNOTATION_JOB_HASH)


def _phase(pod: Obj) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _job_end(pod: Obj) -> Obj:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == job_pods.JOB_CONTAINER:
            return dict((status.get("state") or {}).get("terminated") or {})
    return {}


def _failure(pod: Obj, what: str) -> errors.CsiError:
    """The error a Failed job pod ended with."""
    ended = _job_end(pod)
    message = str(ended.get("message") or "").strip()
    code, separator, text = message.partition(": ")
    if separator and code.isupper():
        return errors.of_code(code, f"{what}: {text}")
    status = pod.get("status") or {}
    # Without an outcome of its own the message is the tail of the job's log
    # (FallbackToLogsOnError): its last lines say what went wrong.
    last_lines = [line.strip() for line in message.splitlines() if line.strip()]
    quoted = " / ".join(last_lines[-FAILURE_LOG_LINES:])
    why = quoted or status.get("message") or status.get("reason") or "no reason given"
    exit_code = ended.get("exitCode")
    exited = f" (its job exited {exit_code})" if exit_code is not None else ""
    return errors.Internal(f"the pod of the {what} failed{exited}: {why}")


def last_step(pod: Obj) -> float:
    """When a call last stepped ``pod`` (epoch seconds); its creation when none did."""
    metadata = pod.get("metadata") or {}
    marked = (metadata.get("annotations") or {}).get(job_pods.ANNOTATION_LAST_STEP, "")
    try:
        return float(marked)
    except ValueError:
        created = str(metadata.get("creationTimestamp") or "")
        try:
            return datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0


def waiting_reasons(pod: Obj) -> list[str]:
    """What a pod that has not ended waits for, as kubelet and the scheduler say."""
    status = pod.get("status") or {}
    reasons = []
    for container in (status.get("initContainerStatuses") or []) + (
        status.get("containerStatuses") or []
    ):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in (None, "PodInitializing", "ContainerCreating"):
            reasons.append(f"{container.get('name')}: {waiting['reason']}")
    for condition in status.get("conditions") or []:
        if condition.get("status") == "False" and condition.get("reason") == "Unschedulable":
            reasons.append(f"unschedulable: {condition.get('message', '')}")
    return reasons


class KubeJobs:
    """Runs job pods in ``namespace``, their job containers on ``image`` (the plugin's)."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        image: str,
        *,
        wait_seconds: float = DEFAULT_WAIT_SECONDS,
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._namespace = namespace
        self._image = image
        self._wait_seconds = wait_seconds

    def run(
        self,
        job: job_pods.Job,
        what: str,
        *,
        preempt: bool = False,
        while_running: Callable[[str], str] = lambda name: "",
    ) -> str:
        """One step of ``job`` (see the module docstring): the job's termination message
        once it succeeded; JobInProgress until then, its message saying ``what`` runs
        and, from ``while_running(pod name)``, how far it got."""
        wanted = job_pods.job_pod(job, self._namespace, self._image)
        where = f"pod {self._namespace}/{job.name}"
        current = self.read(job.name)
        if current is not None and _job_hash(current) != _job_hash(wanted):
            if not preempt and _phase(current) not in ("Succeeded", "Failed"):
                raise JobInProgress(
                    f"{where} runs another job of volume {job.volume_id}: retry once it ended"
                )
            log.info("removing a job pod of another job", extra={"pod": job.name})
            self.remove(job.name)
            raise JobInProgress(f"{where} of another job is being deleted: retry")
        if current is not None and (current.get("metadata") or {}).get("deletionTimestamp"):
            raise JobInProgress(f"{where} is being deleted: retry")
        if current is None:
            current = self._create(job, wanted)
        else:
            self._mark_step(current)
        deadline = time.monotonic() + self._wait_seconds
        while True:
            phase = _phase(current)
            if phase in ("Succeeded", "Failed"):
                self.remove(job.name)
                if phase == "Failed":
                    raise _failure(current, what)
                log.info("job pod succeeded", extra={"pod": job.name, "volume_id": job.volume_id})
                return str(_job_end(current).get("message") or "")
            if time.monotonic() >= deadline:
                progress = while_running(job.name)  # once a call: it may read the pod's log
                state = ", ".join(waiting_reasons(current)) or phase
                raise JobInProgress(
                    f"the {what} runs in {where} ({state}{', ' + progress if progress else ''})"
                    ": retry"
                )
            time.sleep(POLL_INTERVAL_SECONDS)
            found = self.read(job.name)
            if found is None:
                raise JobInProgress(f"{where} was deleted while waited for: retry")
            current = found

    def idle(self, seconds: float) -> list[Obj]:
        """The job pods no call has stepped for ``seconds``."""
        before = time.time() - seconds
        return [pod for pod in self._list() if last_step(pod) < before]

    def running(self, label_selector: str) -> list[str]:
        """The names of the job pods matching ``label_selector`` that have not ended."""
        return [
            str(pod["metadata"]["name"])
            for pod in self._list(label_selector)
            if _phase(pod) not in ("Succeeded", "Failed")
        ]

    def _list(self, label_selector: str = "") -> list[Obj]:
        selector = ",".join(s for s in (JOB_PODS_SELECTOR, label_selector) if s)
        try:
            listing = call_json(
                self._core.list_namespaced_pod, self._namespace, label_selector=selector
            )
        except Exception as exc:
            raise api_failure(exc, f"listing job pods in {self._namespace}") from None
        return list(listing.get("items") or [])

    def _mark_step(self, pod: Obj) -> None:
        now = time.time()
        if now - last_step(pod) < STEP_MARK_INTERVAL_SECONDS:
            return
        name = pod["metadata"]["name"]
        marked = {**pod, "metadata": {**pod["metadata"]}}
        annotations = marked["metadata"]["annotations"] = dict(
            marked["metadata"].get("annotations") or {}
        )
        annotations[job_pods.ANNOTATION_LAST_STEP] = str(int(now))
        try:
            # As read just before: a conflict means it changed meanwhile.
            call_json(self._core.replace_namespaced_pod, name, self._namespace, marked)
        except Exception as exc:
            # Only the sweep reads the mark; the next step marks it again.
            log.warning("could not mark job pod %s as stepped: %s", name, exc)

    def read(self, name: str) -> Obj | None:
        try:
            return call_json(self._core.read_namespaced_pod, name, self._namespace)
        except Exception as exc:
            if is_status(exc, 404):
                return None
            raise api_failure(exc, f"reading job pod {self._namespace}/{name}") from None

    def log_tail(self, name: str, lines: int) -> str:
        """The last ``lines`` of the job container's log; empty before it runs."""
        try:
            text = self._core.read_namespaced_pod_log(
                name,
                self._namespace,
                container=job_pods.JOB_CONTAINER,
                tail_lines=lines,
                _request_timeout=(5.0, 30.0),
            )
        except Exception as exc:
            # Not started, or no node yet: nothing to read.
            log.debug("no log of %s: %s", name, exc)
            return ""
        return str(text)

    def remove(self, name: str) -> None:
        """Delete the job pod ``name`` and its Secret; succeeds when there are none."""
        for kind, delete in (
            ("pod", self._core.delete_namespaced_pod),
            ("Secret", self._core.delete_namespaced_secret),
        ):
            try:
                call_json(delete, name, self._namespace)
            except Exception as exc:
                if not is_status(exc, 404):
                    raise api_failure(
                        exc, f"deleting job {kind} {self._namespace}/{name}"
                    ) from None

    def _create(self, job: job_pods.Job, pod: Obj) -> Obj:
        pod["metadata"]["annotations"][job_pods.ANNOTATION_LAST_STEP] = str(int(time.time()))
        try:
            created = call_json(self._core.create_namespaced_pod, self._namespace, pod)
        except Exception as exc:
            if is_status(exc, 409):
                raise JobInProgress(
                    f"job pod {self._namespace}/{job.name} was created meanwhile: retry"
                ) from None
            raise api_failure(exc, f"creating job pod {self._namespace}/{job.name}") from None
        owner = {"name": job.name, "uid": created["metadata"]["uid"]}
        secret = job_pods.job_secret(job, self._namespace, owner)
        what = f"creating job Secret {self._namespace}/{job.name}"
        for attempt in range(2):
            try:
                call_json(self._core.create_namespaced_secret, self._namespace, secret)
                break
            except Exception as exc:
                if attempt == 0 and is_status(exc, 409):
                    # One left by an earlier pod: it holds that pod's configs.
                    try:
                        call_json(self._core.delete_namespaced_secret, job.name, self._namespace)
                    except Exception as delete_exc:
                        if not is_status(delete_exc, 404):
                            raise api_failure(delete_exc, what) from None
                    continue
                self.remove(job.name)
                # The body holds secret values, which a validation message could echo.
                raise api_failure(exc, what, quote_server=False) from None
        log.info(
            "job pod created",
            extra={"pod": job.name, "volume_id": job.volume_id},
        )
        return created
