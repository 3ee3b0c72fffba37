"""What a run asks of the Ray cluster: decided from the spec once, before any stage runs.

    spec = resolve_resources(spec)   # resources.gpu: auto -> true/false, after asking the autoscaler

An autoscaling cluster starts with no GPU, so what `ray.cluster_resources()` shows at one moment
is no basis for a cached result: the decision is made once per run, logged, written into the
resolved spec, and is part of every stage's cache key (a CPU-trained ERM is never reused as a
GPU one). Also here: the check that a Ray address answers, and `run_task`, which places a
stage's compute on the cluster as a Ray task with the resources the spec gives it.
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import time
from urllib.parse import urlsplit

from .errors import UserError

log = logging.getLogger(__name__)
ADDRESS_TIMEOUT_S = 10.0


def resolve_resources(spec):
    """The spec with `resources.gpu` resolved to True/False on the connected Ray cluster (idempotent)."""
    import ray

    r = spec.resources
    if r.gpu != "auto":
        return spec
    if not ray.is_initialized():  # library use without Ray: this process's own device
        import torch

        use = torch.cuda.is_available()
    else:
        use = ray.cluster_resources().get("GPU", 0) > 0 or (r.autoscale_wait_s > 0 and _ask_autoscaler(spec))
        log.info("resources: %s (resources.gpu auto; the cluster has %g GPU(s))", "GPU" if use else "CPU only",
                 ray.cluster_resources().get("GPU", 0))
    return dataclasses.replace(spec, resources=dataclasses.replace(r, gpu=bool(use)))


def _ask_autoscaler(spec) -> bool:
    """Request erm.num_workers GPUs from the autoscaler; True once they are in the cluster."""
    import ray
    from ray.autoscaler.sdk import request_resources

    n, wait = max(1, spec.erm.num_workers), spec.resources.autoscale_wait_s
    request_resources(bundles=[{"GPU": 1}] * n)
    log.info("resources: asked the autoscaler for %d GPU(s); waiting at most %g s (resources.autoscale_wait_s)",
             n, wait)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        have = ray.cluster_resources().get("GPU", 0)
        if have >= n:
            log.info("resources: %g GPU(s) joined the cluster", have)
            return True
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    have = ray.cluster_resources().get("GPU", 0)
    log.warning("resources: %g of %d GPU(s) after %g s; %s", have, n, wait,
                "using those" if have else "running on CPU")
    return have > 0


def cpus_per_worker(n_workers: int, spec=None) -> int:
    """CPU threads for each of `n_workers` CPU workers: resources.worker_cpus, or (auto) an equal share of
    the free CPUs, but no more than one node has (a worker cannot span nodes; a cluster's head may have none)."""
    import ray

    if spec is not None and spec.resources.worker_cpus != "auto":
        return int(spec.resources.worker_cpus)
    free = int(ray.available_resources().get("CPU", 1))
    per_node = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max(1, min(free // max(1, n_workers), max(per_node or [1])))


def check_address(address: str | None, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """A Ray address that does not answer: a UserError naming it, within `timeout` seconds.

    Covers host:port (GCS), ray://host:port (Ray Client) and http(s)://host:port (a dashboard
    address given by mistake is still probed, and Ray's own error explains the rest). 'auto' and
    'local' are left to Ray.
    """
    if not address or address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    host, port = parts.hostname, parts.port
    if not host or not port:
        raise UserError(f"Ray address '{address}' is not HOST:PORT (or ray://HOST:PORT); e.g. 127.0.0.1:6379, "
                        f"or leave --address out to start a local Ray")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise UserError(f"Ray address '{address}' does not answer ({why}; waited at most {timeout:g} s). Is the "
                        f"cluster up (`ray status`, `ray up cluster.yaml`)? Leave --address and RAY_ADDRESS unset to "
                        f"start a local Ray") from None


def task_options(spec, gpu_capable: bool = True, cpus: float | None = None) -> dict:
    """The Ray options of a stage's task: `cpus` (default resources.task_cpus) CPUs, and 1 GPU when the
    spec resolved resources.gpu to true (and the task can use one)."""
    return {"num_cpus": spec.resources.task_cpus if cpus is None else cpus, "scheduling_strategy": "DEFAULT",
            "max_retries": 2, "num_gpus": 1 if (gpu_capable and spec.resources.gpu is True) else 0}


def run_task(spec, fn, *args, gpu_capable: bool = True, cpus: float | None = None, inline_on_one_node: bool = True):
    """`fn(*args)` as a Ray task with the spec's resources (`task_options`), on whichever node has them.

    It runs in this process instead when a task would buy nothing but a fresh worker process (which
    spends 10 s or more importing torch, timm and scikit-learn before its first line of work):
    without Ray, on a one-node Ray (a laptop, the tests; unless `inline_on_one_node` is False, for
    long work such as the end-to-end fine-tune), and inside a task or actor that already holds what
    the task would ask for (a Tune trial on a worker node). A driver on a cluster's head always hands
    the work to the cluster. scheduling_strategy DEFAULT keeps the task out of a Tune trial's
    placement group: it takes the cluster's free resources, like the heatmap actors do. The options
    go to `ray.remote` itself, not `.options()`, so that a GPU task gets Ray's max_calls=1 for GPU
    functions: its worker exits afterwards and its CUDA memory goes back.
    """
    import ray

    opts = task_options(spec, gpu_capable, cpus)
    if not ray.is_initialized() or (inline_on_one_node and _one_node_here()) or \
            _holds(opts["num_cpus"], opts["num_gpus"]):
        return fn(*args)
    return ray.get(ray.remote(**opts)(fn).remote(*args))


def where_am_i() -> dict:
    """This process, for a stage's record: its pid, its Ray node and whether it is a Ray worker (task, actor)."""
    import os

    import ray

    if not ray.is_initialized():
        return {"pid": os.getpid(), "node_id": None, "ray_worker": False}
    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "ray_worker": ctx.worker.mode == ray.WORKER_MODE}


def _one_node_here() -> bool:
    """True when the connected Ray cluster is this process's node alone."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive) == 1 and alive[0]["NodeID"] == ray.get_runtime_context().get_node_id()


def _holds(cpus: float, gpus: int) -> bool:
    """True inside a task or actor that was given at least these resources (a driver holds none)."""
    import ray

    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return False
    have = ctx.get_assigned_resources()
    return have.get("CPU", 0) >= cpus and have.get("GPU", 0) >= gpus


# distributions whose versions change what a run computes (faiss ships under several names)
_VERSIONED = ("torch", "torchvision", "timm", "numpy", "scikit-learn", "ray", "faiss-cpu", "faiss-gpu-cu12",
              "faiss-gpu-cu13-cuvs", "faiss-gpu")


_CPU_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_tile", "fma"}


def environment() -> dict:
    """What this process computes with: package versions, the CPU (and the kernels torch picked for it),
    torch's threads and any GPU. ERM trained on a CPU gives other weights on another CPU or torch build,
    so results record it (results.json "environment"; the ERM stage records its rank-0 worker's)."""
    import platform
    from importlib import metadata

    import torch

    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    versions["torch"] = str(torch.__version__)  # with its build tag (+cu130, +cpu), which the metadata lacks
    try:
        with open("/proc/cpuinfo") as f:  # Linux: the first processor's model name and flags
            info = dict(ln.split(":", 1) for ln in f.read().split("\n\n", 1)[0].splitlines() if ":" in ln)
    except OSError:
        info = {}
    info = {k.strip(): v.strip() for k, v in info.items()}
    cpu = info.get("model name") or platform.processor() or platform.machine()
    flags = sorted(set(info.get("flags", "").split()) & _CPU_FLAGS)
    return {"python": platform.python_version(), "packages": versions, "cpu": cpu, "cpu_flags": flags,
            "torch_cpu_kernels": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "host": platform.node()}


def describe_environment(env: dict | None) -> str:
    """One line for a table's footer: packages, then where (GPU, or CPU with torch's kernels and threads)."""
    if not env:
        return "not recorded (computed by an older exmap-ray)"
    pk = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items())
    where = env.get("gpu") or (f"{env.get('cpu')} ({env.get('torch_cpu_kernels')} kernels, "
                               f"{env.get('torch_threads')} thread(s))")
    return f"{pk}; on {where}"
