"""The content-addressed stage cache (the IO helpers it writes through are storage.py's).

A stage's folder is `CACHE/<stage>-<hash>`, the hash taken over the stage's own
config and its upstream stages' keys (DomainBed's md5-named job folders,
applied per stage). The `done` marker is written last, atomically; a folder
without it is a crashed attempt and is cleared before the stage is recomputed.
Every compute, reuse and failure is recorded as one object under
`CACHE/records/` (object stores cannot append), so tests and users can check
what was really run.

The cache lives under the storage root (a local path or a URI, see storage.py).
A claim per stage (claims.py) makes it safe under concurrent runs and trials
sharing it: the second waits and then reuses the first's result.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .hashing import stable_hash
from .storage import DiskFullError, Loc, read_json, redact, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    name: str
    key: str
    dir: "Loc"  # under the storage root: a local folder or a URI prefix

    @property
    def done(self) -> bool:
        return (self.dir / "done").is_file()

    def info(self) -> dict:
        return read_json(self.dir / "done")


class StageCache:
    """Stage folders under a storage root (a path or a URI), each computed at most once.

    Claims: before computing, a caller claims the stage; others needing it wait for its `done`
    marker (see `claims.py` for the semantics on local disks and on object stores).
    """

    def __init__(self, root, claims=None):
        self.root = Loc.parse(root)
        self.root.mkdir()
        self.claims = claims

    def stage(self, name: str, config: Any, upstream: tuple[Stage, ...] = ()) -> Stage:
        key = stable_hash({"stage": name, "config": config, "upstream": [s.key for s in upstream]})
        return Stage(name, key, self.root / f"{name}-{key}")

    def _claims(self):
        if self.claims is None:
            from .claims import claims_for

            self.claims = claims_for(self.root)
        return self.claims

    def record(self, stage: Stage, event: str, **extra) -> None:
        """One object per event (object stores cannot append): CACHE/records/<time>-<id>.json."""
        now = time.time()
        rec = {
            "time": now,
            "stage": stage.name,
            "key": stage.key,
            "event": event,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            **extra,
        }
        write_json(self.root / "records" / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json", rec)

    def records(self) -> list[dict]:
        """Every compute, reuse and failure so far, oldest first."""
        recs = [read_json(p) for p in (self.root / "records").glob("*.json")]
        return sorted(recs, key=lambda r: r["time"])

    def run(self, stage: Stage, compute: Callable[["Loc"], dict | None]) -> dict:
        """Return the stage's `done` info, computing it first unless a finished copy exists.

        `compute(folder)` writes the stage's files under `folder` (a Loc: local folder or URI prefix).
        """
        if stage.done:  # the common case on a shared cache: no claim needed to read a finished stage
            self.record(stage, "reused")
            log.info("stage %s: reusing %s", stage.name, redact(str(stage.dir)))
            return stage.info()
        with self._claims().hold(stage):
            if stage.done:  # another claimant finished it while this one waited
                self.record(stage, "reused")
                log.info(
                    "stage %s: reusing %s (computed by another claimant meanwhile)", stage.name, redact(str(stage.dir))
                )
                return stage.info()
            if stage.dir.exists():
                log.warning("stage %s: clearing unfinished attempt in %s", stage.name, redact(str(stage.dir)))
                stage.dir.rmtree()
            stage.dir.mkdir(parents=True)
            t0 = time.perf_counter()
            try:
                info = dict(compute(stage.dir) or {})
            except DiskFullError:
                stage.dir.rmtree()  # give the space back; it was never done
                self.record(stage, "failed", reason="disk full")
                raise
            info["seconds"] = time.perf_counter() - t0
            write_json(stage.dir / "done", info)  # last: the stage counts as done only now
            self.record(stage, "computed", seconds=info["seconds"])
            return info
