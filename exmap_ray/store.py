"""Atomic artifact writes and the content-addressed stage cache.

A stage's folder is `CACHE/<stage>-<hash>`, the hash taken over the stage's own
config and its upstream stages' keys (DomainBed's md5-named job folders,
applied per stage). The `done` marker is written last, atomically; a folder
without it is a crashed attempt and is cleared before the stage is recomputed.
Every compute and every reuse is appended to `CACHE/record.jsonl`, so tests
and users can check what was really run.

A per-stage file lock makes the cache safe under concurrent runs sharing it
(Tune trials): the second waits and then reuses the first's result.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import UserError
from .spec import stable_hash

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


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


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
    dir: Path

    @property
    def done(self) -> bool:
        return (self.dir / "done").is_file()

    def info(self) -> dict:
        return read_json(self.dir / "done")


class StageCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def stage(self, name: str, config: Any, upstream: tuple[Stage, ...] = ()) -> Stage:
        key = stable_hash({"stage": name, "config": config, "upstream": [s.key for s in upstream]})
        return Stage(name, key, self.root / f"{name}-{key}")

    @contextlib.contextmanager
    def _lock(self, stage: Stage) -> Iterator[None]:
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(exist_ok=True)
        with open(lock_dir / f"{stage.name}-{stage.key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def record(self, stage: Stage, event: str, **extra) -> None:
        line = json.dumps({"time": time.time(), "stage": stage.name, "key": stage.key, "event": event,
                           "host": socket.gethostname(), "pid": os.getpid(), **extra}, default=_json_default)
        with open(self.root / "record.jsonl", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            fh.write(line + "\n")
            fcntl.flock(fh, fcntl.LOCK_UN)

    def records(self) -> list[dict]:
        path = self.root / "record.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []

    def run(self, stage: Stage, compute: Callable[[Path], dict | None]) -> dict:
        """Return the stage's `done` info, computing it first unless a finished copy exists."""
        with self._lock(stage):
            if stage.done:
                self.record(stage, "reused")
                log.info("stage %s: reusing %s", stage.name, stage.dir)
                return stage.info()
            if stage.dir.exists():
                log.warning("stage %s: clearing unfinished attempt in %s", stage.name, stage.dir)
                shutil.rmtree(stage.dir)
            stage.dir.mkdir(parents=True)
            t0 = time.perf_counter()
            try:
                info = dict(compute(stage.dir) or {})
            except DiskFullError:
                shutil.rmtree(stage.dir, ignore_errors=True)  # give the space back; it was never done
                self.record(stage, "failed", reason="disk full")
                raise
            info["seconds"] = time.perf_counter() - t0
            write_json(stage.dir / "done", info)  # last: the stage counts as done only now
            self.record(stage, "computed", seconds=info["seconds"])
            return info
