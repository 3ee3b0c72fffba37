"""Who computes a stage: claims that work without file locks on object stores.

Semantics (the same for every backend):
- A stage is computed only by the holder of its claim. Everyone else who needs it waits until
  its `done` marker appears (then reuses it), or until the claim is free (then claims it).
- A holder that dies loses its claim: on a local disk when its process ends (the kernel drops
  the `flock`); on a storage URI when its lease runs out (`EXMAP_RAY_CLAIM_LEASE_S`, default
  60 s, renewed by a thread every quarter lease) or at once when its Ray node is dead. A new
  claimant then clears the dead holder's unfinished folder and computes the stage afresh.
- Outputs are written before `done`, and `done` is written last, so a reader that sees `done`
  sees complete outputs, whoever wrote them.

Backends:
- a local root: `flock` on CACHE/.locks/<stage>.lock (as before; works across processes and
  across separate Ray instances on one machine);
- a URI root, inside Ray: one named, detached actor per root (`exmap-ray-claims-<hash>` in
  namespace `exmap_ray`), pinned to the node of the process that made it first (the driver, on
  the head). Every run, trial and task of that Ray cluster that uses the root shares it. Two
  *separate* Ray clusters writing the same URI root are not coordinated: give them different
  roots (they may still read each other's finished stages);
- a URI root outside Ray: claims within this process only (tools and tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from typing import Iterator

log = logging.getLogger(__name__)
LEASE_ENV = "EXMAP_RAY_CLAIM_LEASE_S"
NAMESPACE = "exmap_ray"


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV, "60"))


class FileClaims:
    """flock-based claims for a local root."""

    def __init__(self, root):
        self.dir = root.local_path / ".locks"

    @contextlib.contextmanager
    def hold(self, stage) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"{stage.name}-{stage.key}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


class ProcessClaims:
    """Claims within one process (a URI root used without Ray)."""

    _locks: dict[str, threading.Lock] = {}

    @contextlib.contextmanager
    def hold(self, stage) -> Iterator[None]:
        lock = self._locks.setdefault(f"{stage.name}-{stage.key}", threading.Lock())
        with lock:
            yield


class ClaimTable:
    """The Ray actor behind RayClaims: stage key -> (holder, node, lease expiry)."""

    def __init__(self):
        self.claims: dict[str, tuple[str, str | None, float]] = {}
        self._alive: tuple[float, set[str]] = (0.0, set())

    def _node_alive(self, node: str | None) -> bool:
        if node is None:
            return True
        import ray

        t, alive = self._alive
        if time.monotonic() - t > 1.0:
            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
            self._alive = (time.monotonic(), alive)
        return node in alive

    def try_claim(self, key: str, holder: str, node: str | None, lease: float) -> bool:
        now = time.time()
        cur = self.claims.get(key)
        if cur is None or cur[0] == holder or cur[2] < now or not self._node_alive(cur[1]):
            self.claims[key] = (holder, node, now + lease)
            return True
        return False

    def renew(self, key: str, holder: str, lease: float) -> bool:
        cur = self.claims.get(key)
        if cur is not None and cur[0] == holder:
            self.claims[key] = (holder, cur[1], time.time() + lease)
            return True
        return False

    def release(self, key: str, holder: str) -> None:
        if self.claims.get(key, (None,))[0] == holder:
            del self.claims[key]

    def holders(self) -> dict[str, str]:
        return {k: v[0] for k, v in self.claims.items()}


class RayClaims:
    """Lease-based claims held by one named actor per storage root (see the module docstring)."""

    def __init__(self, root, poll_s: float = 0.5):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .hashing import stable_hash

        self.name = f"exmap-ray-claims-{stable_hash(str(root))}"
        self.poll_s = poll_s
        node = ray.get_runtime_context().get_node_id()
        self.actor = (
            ray.remote(ClaimTable)
            .options(
                name=self.name,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_restarts=-1,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            )
            .remote()
        )

    @contextlib.contextmanager
    def hold(self, stage) -> Iterator[None]:
        import ray

        key = f"{stage.name}-{stage.key}"
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        node = ray.get_runtime_context().get_node_id()
        lease = lease_seconds()
        waited = False
        while not ray.get(self.actor.try_claim.remote(key, holder, node, lease)):
            if stage.done:  # computed by the holder meanwhile: the caller reuses it, no claim needed
                yield
                return
            if not waited:
                log.info("stage %s: another run or trial is computing it; waiting for it", stage.name)
                waited = True
            time.sleep(self.poll_s)
        stop = threading.Event()

        def renew():
            while not stop.wait(lease / 4):
                try:
                    if not ray.get(self.actor.renew.remote(key, holder, lease)):
                        log.warning("stage %s: claim lost (lease expired); another claimant may redo it", stage.name)
                        return
                except Exception as e:  # noqa: BLE001 - the actor restarts; the lease decides
                    log.warning("stage %s: claim renewal failed (%s)", stage.name, e)

        t = threading.Thread(target=renew, daemon=True, name=f"claim-{key}")
        t.start()
        try:
            yield
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                ray.get(self.actor.release.remote(key, holder))


def claims_for(root):
    """The claim backend for a storage root (see the module docstring)."""
    if root.is_local:
        return FileClaims(root)
    import ray

    if ray.is_initialized():
        return RayClaims(root)
    return ProcessClaims()
