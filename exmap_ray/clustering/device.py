"""Where clustering computes: set by the caller from the stage key, never from what is installed or visible.

    with clustering_device("cuda:0"):        # clusters_task: resources.stage_device(spec), resources.gpu true
        labels, info = cluster(X, cspec, seed)

Outside such a block (the driver's bench rows, library use, `resources.gpu: false`) everything runs on
the CPU exactly as before: FAISS's CPU k-means, the joint-restart Lloyd above SCALE_MIN_N points. On the
GPU route k-means and the anchor route's nearest-anchor search run on the one device given: FAISS's GPU
build on it when that is installed, else torch (`kmeans.kmeans_torch`). The device given is the GPU Ray
assigned the task (or "cpu" under the test-only EXMAP_RAY_FAKE_CUDA, which then runs the torch route on
the CPU). Nothing here asks FAISS how many GPUs it sees: on a node without a driver that call can abort.
"""

from __future__ import annotations

import contextlib
import contextvars

import faiss

_DEVICE: contextvars.ContextVar = contextvars.ContextVar("exmap_ray_clustering_device", default=None)
_RESOURCES: dict = {}  # one StandardGpuResources per device and process: each holds scratch GPU memory


@contextlib.contextmanager
def clustering_device(device: str | None):
    """Clustering inside this block takes the GPU route on torch device `device` ('cuda:I', or 'cpu' for
    the torch route on the CPU); None (or 'cpu' from a CPU stage, see `route`) keeps the CPU route."""
    token = _DEVICE.set(device)
    try:
        yield
    finally:
        _DEVICE.reset(token)


def current() -> str | None:
    """The GPU route's torch device, or None on the CPU route."""
    return _DEVICE.get()


def faiss_gpu() -> bool:
    """True on the GPU route on a CUDA device with FAISS's GPU build installed."""
    dev = current()
    return dev is not None and dev.startswith("cuda") and hasattr(faiss, "StandardGpuResources")


def _index_of(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def faiss_index(index):
    """`index` on the route's GPU (that one device alone) when `faiss_gpu()`, else `index` as it is."""
    if not faiss_gpu():
        return index
    i = _index_of(current())
    if i not in _RESOURCES:
        _RESOURCES[i] = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_RESOURCES[i], i, index)


def torch_route() -> str | None:
    """The torch device of the GPU route where FAISS's GPU build is absent; None otherwise."""
    dev = current()
    return dev if dev is not None and not faiss_gpu() else None
