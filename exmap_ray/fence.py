"""Fencing a sweep's dead driver: one driver at a time owns a sweep folder, and only its trials write.

A driver killed mid-sweep leaves its trial actors running for seconds (Ray ends a dead job's actors when
it notices the job is gone); on a cluster, longer. A `--resume` started in that window must not share the
folder, the trial records or MLflow with them. Two fences:

1. **A token in the sweep folder** (`sweep_fence.json`, on the storage root every node reads): each driver
   claims it with a fresh attempt id before any trial starts. A trial checks the token before it starts,
   right after its MLflow run is created, and before it writes anything that counts (its results and its
   done record); a trial whose attempt no longer holds the token stops with `Fenced`, and its MLflow run
   ends KILLED. A dead driver's trial can thus write nothing that counts after the resume has claimed the
   folder; what it wrote before is what a kill leaves anyway.
2. **The dead driver's Ray job**: the token records the claiming driver's Ray job id; a resume on the same
   Ray cluster waits (up to `JOB_WAIT_S`) until no actor of that job is alive, so the stale trials are gone,
   not only fenced, before new ones start. A job on another (restarted) cluster has nothing to wait for.

    attempt, before = claim(out)          # the driver, before its trials
    wait_for_job(before.get("ray_job"))   # a resume: the dead driver's actors gone
    check(out, attempt, "the trial's start")  # a trial; raises Fenced once another driver claimed the folder
"""

from __future__ import annotations

import logging
import time
import uuid

from .errors import Fenced
from .storage import Loc, read_json, write_json

log = logging.getLogger(__name__)
FENCE = "sweep_fence.json"
__all__ = ["FENCE", "Fenced", "check", "claim", "holder", "wait_for_job"]
JOB_WAIT_S = 120.0  # how long a resume waits for the dead driver's actors to end before it goes on (fenced)


def claim(out, ray_job: str | None = None) -> tuple[str, dict]:
    """Make this driver the folder's owner: (its new attempt id, the previous owner's record or {})."""
    path = Loc.parse(out) / FENCE
    before = read_json(path) if path.is_file() else {}
    attempt = uuid.uuid4().hex
    write_json(path, {"attempt": attempt, "ray_job": ray_job, "claimed_at": time.time()})  # atomic
    return attempt, before


def holder(out) -> str | None:
    path = Loc.parse(out) / FENCE
    return read_json(path).get("attempt") if path.is_file() else None


def check(out, attempt: str, where: str) -> None:
    """Raise `Fenced` unless `attempt` still holds the sweep folder `out` (no token at all: not fenced)."""
    if not attempt:
        return
    now = holder(out)
    if now is not None and now != attempt:
        raise Fenced(
            f"sweep attempt {attempt[:8]} stops at {where}: the sweep in '{out}' was resumed by attempt {now[:8]}; "
            f"this trial belongs to the interrupted driver and writes nothing more"
        )


def current_ray_job() -> str | None:
    import ray

    return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None


def alive_actors(job_id: str) -> int:
    """Actors of Ray job `job_id` not yet dead, from the GCS (no dashboard needed); -1 where unknown."""
    try:
        from ray._private import state

        table = state.actors()
    except Exception:  # noqa: BLE001 - a private API: without it the token alone fences
        return -1
    return sum(1 for a in table.values() if a.get("JobID") == job_id and a.get("State") != "DEAD")


def wait_for_job(job_id: str | None, timeout: float = JOB_WAIT_S, poll: float = 0.5) -> int:
    """Wait until the dead driver's Ray job has no live actor; returns how many were left at the end (0: none,
    -1: not known). The current job is never waited for."""
    if not job_id or job_id == current_ray_job():
        return 0
    deadline = time.monotonic() + timeout
    left = alive_actors(job_id)
    if left > 0:
        log.info("sweep: waiting for %d actor(s) of the interrupted driver (Ray job %s) to end", left, job_id)
    while left > 0 and time.monotonic() < deadline:
        time.sleep(poll)
        left = alive_actors(job_id)
    if left > 0:
        log.warning(
            "sweep: %d actor(s) of the interrupted driver (Ray job %s) still run after %.0f s; they are fenced "
            "off (%s) and write nothing that counts",
            left,
            job_id,
            timeout,
            FENCE,
        )
    return left
