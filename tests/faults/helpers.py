"""Fault injection against real processes: find a Ray actor's process and SIGKILL it."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable


def alive_actor_pids(class_name: str) -> list[int]:
    """Process ids of this test's Ray's live actors of `class_name`, from the GCS's actor table (the
    session's Ray runs without a dashboard, which Ray's state API would need)."""
    from ray._private.state import actors

    return [
        a["Pid"]
        for a in actors().values()
        if a["ActorClassName"] == class_name and a["State"] == "ALIVE" and a.get("Pid")
    ]


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
