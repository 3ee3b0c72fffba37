"""Fault injection against real processes: find a Ray actor's process and SIGKILL it."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable


def alive_actor_pids(class_name: str) -> list[int]:
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # this test's Ray, even if others run on the machine
    return [a.pid for a in list_actors(address=address, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
            if a.pid]


class KillWhen(threading.Thread):
    """SIGKILL one live actor of `class_name` as soon as `ready()` is true; records what it killed."""

    def __init__(self, class_name: str, ready: Callable[[], bool], timeout: float = 120.0):
        super().__init__(daemon=True)
        self.class_name, self.ready, self.timeout = class_name, ready, timeout
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.time()
        while not self.stop.is_set() and time.time() - t0 < self.timeout:
            if self.ready():
                pids = alive_actor_pids(self.class_name)
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed = pids[0]
                    return
            time.sleep(0.02)


def files(folder: Path, pattern: str) -> list[Path]:
    return list(Path(folder).glob(pattern)) if Path(folder).exists() else []
