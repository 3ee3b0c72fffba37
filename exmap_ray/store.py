"""Atomic artifact writes and the content-addressed stage cache.

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

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from .errors import UserError
from .hashing import stable_hash

if TYPE_CHECKING:
    from .storage import Loc

log = logging.getLogger(__name__)


class DiskFullError(UserError):
    """The filesystem ran out of space (or quota) while an artifact was being written."""


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, else remove it.

    A full disk becomes a `DiskFullError` naming the file; the temp file is removed, so no
    partial artifact is ever left under its final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        free = _free_bytes(path.parent)
        # numpy's tofile reports a short write without an errno ("N requested and M written")
        short_write = e.errno is None and "requested and" in str(e) and free is not None and free < 2**20
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) and not short_write:
            raise
        raise DiskFullError(
            f"disk full while writing '{path}' ({os.strerror(e.errno or errno.ENOSPC)}; "
            f"{'unknown' if free is None else f'{free / 2**20:.1f} MiB'} free on its filesystem). Free some space "
            f"or point --out/--cache at a bigger disk, then run again: the partial file was removed and its "
            f"stage was not marked done, so nothing partial will be reused") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _to_loc(path):
    from .storage import Loc

    return Loc.parse(path)


def write_json(path: "Path | Loc", obj: Any) -> None:
    """Atomically, to a local path or a storage location."""
    _to_loc(path).write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: "Path | Loc") -> Any:
    loc = _to_loc(path)
    text = loc.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        from .storage import redact

        raise ValueError(f"{redact(str(loc))} is not valid JSON ({e}); it starts {text[:80]!r}") from e


def save_npy(path: "Path | Loc", arr: np.ndarray) -> None:
    with _to_loc(path).writer() as f:
        np.save(f, arr)


def save_npz(path: "Path | Loc", **arrays: np.ndarray) -> None:
    with _to_loc(path).writer() as f:
        np.savez(f, **arrays)


def load_npy(path: "Path | Loc", mmap: bool = False) -> np.ndarray:
    """A .npy from a local path or the storage root (remote files go through the node-local cache)."""
    return np.load(_to_loc(path).local_copy(), mmap_mode="r" if mmap else None)


def load_npz(path: "Path | Loc") -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(_to_loc(path).read_bytes())) as z:
        return dict(z)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


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
        from .storage import Loc

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
        rec = {"time": now, "stage": stage.name, "key": stage.key, "event": event,
               "host": socket.gethostname(), "pid": os.getpid(), **extra}
        write_json(self.root / "records" / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json", rec)

    def records(self) -> list[dict]:
        """Every compute, reuse and failure so far, oldest first."""
        recs = [read_json(p) for p in (self.root / "records").glob("*.json")]
        return sorted(recs, key=lambda r: r["time"])

    def run(self, stage: Stage, compute: Callable[["Loc"], dict | None]) -> dict:
        """Return the stage's `done` info, computing it first unless a finished copy exists.

        `compute(folder)` writes the stage's files under `folder` (a Loc: local folder or URI prefix).
        """
        from .storage import redact

        if stage.done:  # the common case on a shared cache: no claim needed to read a finished stage
            self.record(stage, "reused")
            log.info("stage %s: reusing %s", stage.name, redact(str(stage.dir)))
            return stage.info()
        with self._claims().hold(stage):
            if stage.done:  # another claimant finished it while this one waited
                self.record(stage, "reused")
                log.info("stage %s: reusing %s (computed by another claimant meanwhile)", stage.name,
                         redact(str(stage.dir)))
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
