"""What a run asks of the Ray cluster: decided from the spec once, before any stage runs.

    spec = resolve_resources(spec)   # resources.gpu: auto -> true/false, after asking the autoscaler

An autoscaling cluster starts with no GPU, so what `ray.cluster_resources()` shows at one moment
is no basis for a cached result: the decision is made once per run, logged, written into the
resolved spec, and is part of every stage's cache key (a CPU-trained ERM is never reused as a
GPU one). Also here: the check that a Ray address answers, and `run_task`, which places a
stage's compute on the cluster as a Ray task with the resources the spec gives it.

The device rule (`stage_device`): a stage computes on CUDA only when the resolved spec says
`resources.gpu: true` *and* Ray assigned this process a GPU (a task's, an actor's, a Ray Train
worker's or a Tune trial's share: `ray.get_gpu_ids()`); never from what the process happens to see
(Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone in a 0-GPU task, so such a task sees every GPU of its
node). A node Ray lists GPUs on where torch sees no CUDA stops the run with a `GpuMismatchError`
(exit 2) naming the node, torch's CUDA build, the driver and the fix (`check_gpu_nodes`, before any
stage; `require_cuda`, in each GPU process).

Test-only: EXMAP_RAY_FAKE_CUDA=1 (read in `fake_cuda` alone) makes the torch side of a GPU stage
run on the CPU while Ray schedules logical GPUs (`ray.init(num_gpus=2)`), so the schedule is tested
on machines without a GPU (docs/gpu.md).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from urllib.parse import urlsplit

from .errors import UserError

log = logging.getLogger(__name__)
ADDRESS_TIMEOUT_S = 10.0
FAKE_CUDA_ENV = "EXMAP_RAY_FAKE_CUDA"
PROBE_TIMEOUT_S = 120.0  # a GPU node's probe task: a fresh worker importing torch (seconds), on any load
# the oldest NVIDIA driver each CUDA major version runs on (minor-version compatibility; NVIDIA's tables)
MIN_DRIVER = {"13": "580.65.06", "12": "525.60.13"}


class GpuMismatchError(UserError):
    """Ray lists a GPU on a node where torch sees no CUDA device (a driver older than torch's CUDA build,
    a CPU-only torch, no driver in the container), or a GPU stage would run without a GPU."""


def fake_cuda() -> bool:
    """Test-only stand-in (the one place EXMAP_RAY_FAKE_CUDA is read): GPU stages keep their Ray GPUs but
    compute with torch on the CPU, so the GPU schedule runs on machines without one."""
    return os.environ.get(FAKE_CUDA_ENV, "") == "1"


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
        have, want = ray.cluster_resources().get("GPU", 0), max(1, spec.erm.num_workers)
        use = have > 0
        if r.autoscale_wait_s > 0 and have < want:
            use = _ask_autoscaler(spec, want)
        log.info(
            "resources: %s (resources.gpu auto; the cluster has %g GPU(s))",
            "GPU" if use else "CPU only",
            ray.cluster_resources().get("GPU", 0),
        )
    return dataclasses.replace(spec, resources=dataclasses.replace(r, gpu=bool(use)))


_ASKED = {"bundles": 0}  # what this process asked the autoscaler for, so that the job's end can withdraw it


def _ask_autoscaler(spec, n: int) -> bool:
    """Request `n` GPUs from the autoscaler and wait at most resources.autoscale_wait_s for them.

    True once any GPU is in the cluster (more may join while the run goes on: the request stands until
    the job ends, `release_autoscaler_request`). None at all after the wait is an error, not a quiet
    CPU run: the user asked for GPUs by setting the wait, and a CPU run would be hours slower and
    under other cache keys."""
    import ray
    from ray.autoscaler.sdk import request_resources

    wait = spec.resources.autoscale_wait_s
    request_resources(bundles=[{"GPU": 1}] * n)
    _ASKED["bundles"] = n
    log.info(
        "resources: asked the autoscaler for %d GPU(s); waiting at most %g s (resources.autoscale_wait_s)", n, wait
    )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        have = ray.cluster_resources().get("GPU", 0)
        if have >= n:
            log.info("resources: %g GPU(s) joined the cluster", have)
            return True
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
    have = ray.cluster_resources().get("GPU", 0)
    if not have:
        release_autoscaler_request()
        raise UserError(
            f"resources.gpu auto asked the autoscaler for {n} GPU(s) and none joined the "
            f"cluster within {wait:g} s (resources.autoscale_wait_s). Check `ray status` and the "
            f"autoscaler's log (instance quota, capacity in the region, the GPU node type in "
            f"cluster.yaml), or wait longer (--set resources.autoscale_wait_s=1200), or run on "
            f"the CPU on purpose (--set resources.gpu=false)"
        )
    log.warning(
        "resources: %g of %d GPU(s) after %g s; running on those (the request stands until the job "
        "ends, so more may join)",
        have,
        n,
        wait,
    )
    return True


def release_autoscaler_request() -> None:
    """Withdraw this process's `request_resources` (at the end of a job, and when it fails): a standing
    request keeps GPU nodes up after the job, which `idle_timeout_minutes` then never scales down."""
    import ray

    if not _ASKED["bundles"] or not ray.is_initialized():
        return
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=[])
        log.info("resources: withdrew the autoscaler request for %d GPU(s)", _ASKED["bundles"])
        _ASKED["bundles"] = 0
    except Exception as e:  # noqa: BLE001 - a lost GCS at shutdown: the request dies with the cluster
        log.warning("resources: could not withdraw the autoscaler request (%s: %s)", type(e).__name__, e)


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
        raise UserError(
            f"Ray address '{address}' is not HOST:PORT (or ray://HOST:PORT); e.g. 127.0.0.1:6379, "
            f"or leave --address out to start a local Ray"
        )
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise UserError(
            f"Ray address '{address}' does not answer ({why}; waited at most {timeout:g} s). Is the "
            f"cluster up (`ray status`, `ray up cluster.yaml`)? Leave --address and RAY_ADDRESS unset to "
            f"start a local Ray"
        ) from None


def task_options(spec, gpu_capable: bool = True, cpus: float | None = None) -> dict:
    """The Ray options of a stage's task: `cpus` (default resources.task_cpus) CPUs, and resources.task_gpus
    of a GPU when the spec resolved resources.gpu to true (and the task can use one)."""
    gpu = gpu_capable and spec.resources.gpu is True
    return {
        "num_cpus": spec.resources.task_cpus if cpus is None else cpus,
        "scheduling_strategy": "DEFAULT",
        "max_retries": 2,
        "num_gpus": spec.resources.task_gpus if gpu else 0,
    }


def run_task(spec, fn, *args, gpu_capable: bool = True, cpus: float | None = None, inline_on_one_node: bool = True):
    """`fn(*args)` as a Ray task with the spec's resources (`task_options`), on whichever node has them.

    A GPU stage runs in this process only when Ray assigned this process a GPU share already (a Tune
    trial holding search.trial_gpus): it computes on that share instead of asking for another, which
    trials holding every GPU would never free. Anywhere else it is a task asking for its GPU, so it
    never lands on a node without one (a 0-GPU head) and a driver never takes a CUDA context.
    A CPU stage runs in this process when a task would buy nothing but a fresh worker process (10 s
    or more of imports): without Ray, on a one-node Ray (unless `inline_on_one_node` is False, for
    long work such as the end-to-end fine-tune), and in a task or trial that holds its CPUs.
    scheduling_strategy DEFAULT keeps the task out of a Tune trial's placement group. The options go
    to `ray.remote` itself, not `.options()`, so that a GPU task gets Ray's max_calls=1 for GPU
    functions: its worker exits afterwards and its CUDA memory goes back. A UserError raised in the
    task (a GPU mismatch, bad data) comes back as itself, so the CLI exits 2 with its message.
    """
    import ray

    opts = task_options(spec, gpu_capable, cpus)
    if not ray.is_initialized():
        return fn(*args)
    here = holds_gpu() if opts["num_gpus"] else (inline_on_one_node and _one_node_here()) or _holds(opts["num_cpus"], 0)
    if here:
        return fn(*args)
    try:
        return ray.get(ray.remote(**opts)(fn).remote(*args))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise e.cause from None
        raise


def where_am_i(device: str | None = None) -> dict:
    """This process, for a stage's record: its pid, Ray node, whether it is a Ray worker, the GPU ids Ray
    assigned it and (given) the torch device it computed on; `fake_cuda` when EXMAP_RAY_FAKE_CUDA ran a
    GPU stage's torch side on the CPU."""
    import ray

    out = {"pid": os.getpid(), "node_id": None, "ray_worker": False, "gpu_ids": gpu_ids()}
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        out.update(node_id=ctx.get_node_id(), ray_worker=ctx.worker.mode == ray.WORKER_MODE)
    if device is not None:
        out.update(device=device, fake_cuda=fake_cuda())
    return out


def _one_node_here() -> bool:
    """True when the connected Ray cluster is this process's node alone."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return len(alive) == 1 and alive[0]["NodeID"] == ray.get_runtime_context().get_node_id()


def _holds(cpus: float, gpus: float) -> bool:
    """True inside a task or actor that was given at least these resources (a driver holds none)."""
    import ray

    ctx = ray.get_runtime_context()
    if ctx.worker.mode != ray.WORKER_MODE:
        return False
    have = ctx.get_assigned_resources()
    return have.get("CPU", 0) >= cpus and have.get("GPU", 0) >= gpus


def holds_gpu() -> bool:
    """True in a task, actor or trial that Ray assigned a GPU share (whole or fractional)."""
    import ray

    return (
        ray.is_initialized()
        and ray.get_runtime_context().worker.mode == ray.WORKER_MODE
        and ray.get_runtime_context().get_assigned_resources().get("GPU", 0) > 0
    )


# ── the device rule ─────────────────────────────────────────────────────────────────────────────


def gpu_ids() -> list[str]:
    """The GPU ids Ray assigned this process (a fractional share included); [] in a driver, in a task or
    actor given no GPU, and without Ray."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return []
    return [str(i) for i in ray.get_gpu_ids()]


def _cuda_index(ids: list[str]) -> int:
    """torch's index of Ray's first assigned GPU: its place in CUDA_VISIBLE_DEVICES (Ray Train lists
    every worker's GPU of the node there; a task's or trial's holds its own alone)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible.index(ids[0]) if ids and ids[0] in visible else 0


def stage_device(spec, precision: str | None = None) -> str:
    """The torch device of a stage's compute in this process, by the one rule: 'cpu' unless the resolved
    spec says resources.gpu true; then the GPU Ray assigned this process ('cuda:I'). Without Ray (library
    use), this process's own CUDA device. A GPU stage in a process Ray gave no GPU is a scheduling bug
    (RuntimeError); a node where torch sees no CUDA is a GpuMismatchError. On CUDA it also sets the
    flags every stage runs with (`configure_cuda`: cuDNN autotuning; TF32 only for precision 'tf32')."""
    import ray

    if spec.resources.gpu is not True:
        return "cpu"
    ids = gpu_ids()
    if ray.is_initialized() and not ids:
        raise RuntimeError(
            f"a GPU stage (resources.gpu true) is running in a process Ray assigned no GPU "
            f"({where_am_i()}); GPU stages go through resources.run_task or an actor with "
            f"a GPU"
        )
    if fake_cuda():
        return "cpu"
    require_cuda()
    device = f"cuda:{_cuda_index(ids)}"
    configure_cuda(device, precision)
    return device


def configure_cuda(device: str, precision: str | None = None) -> None:
    """What every GPU stage runs with: this device current, cuDNN picking its fastest kernels for the
    (fixed) shapes it sees, and TF32 off unless the precision key says 'tf32', so that 'fp32' means
    fp32 on Ampere and later too (torch's own default lets cuDNN convolutions use TF32)."""
    import torch

    torch.cuda.set_device(torch.device(device))
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version, read from /proc (no CUDA call); None where there is none."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
    except OSError:
        return None
    words = [w for w in first.split() if w[:1].isdigit() and "." in w]
    return words[0] if words else first.strip() or None


def probe_here() -> dict:
    """What this process's torch makes of the node's GPUs (a probe task's answer; see check_gpu_nodes)."""
    import platform

    import torch

    import ray

    node = {"node_id": None, "ip": None}
    if ray.is_initialized():
        node = {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}
    return {
        **node,
        "host": platform.node(),
        "torch": str(torch.__version__),
        "torch_cuda": torch.version.cuda,
        "fake_cuda": fake_cuda(),
        "cuda_available": bool(torch.cuda.is_available()) or fake_cuda(),
        "devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "driver": driver_version(),
        "ray_gpu_ids": gpu_ids(),
    }


def mismatch_message(p: dict, ray_gpus: float | None = None) -> str:
    """The error for a node whose GPUs torch cannot use: the node, torch's CUDA build, the driver, the fix."""
    where = f"node {p.get('ip') or p.get('host')} ({p.get('host')}, Ray node {str(p.get('node_id'))[:12]})"
    listed = (
        f"Ray lists {ray_gpus:g} GPU(s) there"
        if ray_gpus is not None
        else f"Ray assigned GPU {','.join(p.get('ray_gpu_ids') or []) or '?'} there"
    )
    if not p.get("torch_cuda"):
        build = f"torch {p['torch']} is a CPU-only build"
        fix = "install the CUDA build pinned in constraints.txt (pip install -c constraints.txt -e .)"
    else:
        need = MIN_DRIVER.get(str(p["torch_cuda"]).split(".")[0])
        build = f"torch {p['torch']} is built for CUDA {p['torch_cuda']}" + (
            f", which needs an NVIDIA driver >= {need}" if need else ""
        )
        fix = (
            f"give the node a driver >= {need or 'the one its CUDA needs'} (cluster.yaml: an ImageId "
            f"whose driver is that new), or install a torch built for the CUDA this driver runs"
        )
    driver = (
        f"the driver is {p['driver']}"
        if p.get("driver")
        else "no NVIDIA driver is readable (/proc/driver/nvidia/version is missing: none in this container or host?)"
    )
    return (
        f"GPU mismatch on {where}: {listed}, but torch sees no CUDA device. {build}; {driver}. "
        f"Fix: {fix}; or run on the CPU with --set resources.gpu=false"
    )


def require_cuda() -> None:
    """A GpuMismatchError (exit 2) unless torch in this process sees a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        raise GpuMismatchError(mismatch_message(probe_here()))


def check_gpu_nodes(spec, force: bool = False) -> list[dict]:
    """Before any stage of a GPU run (`resources.gpu` true), in the driver: one probe task per alive node
    that Ray lists GPUs on (pinned there, 0 CPUs, its worker exiting afterwards so that no process keeps
    a CUDA driver handle made with every GPU visible). Any node whose torch sees no CUDA stops the run
    with a GpuMismatchError naming it. Nodes that join later are checked by `require_cuda` in each GPU
    process. `force`: also in a Ray worker (a trial's ERM that failed; a trial does not probe at its start,
    its sweep's driver did). Returns the probes (logged)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if (
        spec.resources.gpu is not True
        or not ray.is_initialized()
        or (ray.get_runtime_context().worker.mode == ray.WORKER_MODE and not force)
    ):
        return []
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0]
    probe = ray.remote(num_cpus=0, max_calls=1)(probe_here)
    pin = lambda n: NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)  # noqa: E731
    refs = {probe.options(scheduling_strategy=pin(n)).remote(): n for n in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    probes, bad = [], []
    for ref in ready:
        p = ray.get(ref)
        probes.append(p)
        log.info(
            "resources: GPU node %s: torch %s (CUDA %s), driver %s, %d device(s)%s",
            p["ip"],
            p["torch"],
            p["torch_cuda"],
            p["driver"],
            p["devices"],
            " [EXMAP_RAY_FAKE_CUDA]" if p["fake_cuda"] else "",
        )
        if not p["cuda_available"]:
            bad.append(mismatch_message(p, refs[ref]["Resources"]["GPU"]))
    for ref in late:
        log.warning(
            "resources: the GPU probe of node %s did not answer within %g s; its GPU stages check CUDA themselves",
            refs[ref].get("NodeManagerAddress"),
            PROBE_TIMEOUT_S,
        )
        ray.cancel(ref, force=True)
    if bad:
        raise GpuMismatchError("\n".join(bad))
    return probes


# distributions whose versions change what a run computes (faiss ships under several names)
_VERSIONED = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "scikit-learn",
    "ray",
    "faiss-cpu",
    "faiss-gpu-cu12",
    "faiss-gpu-cu13-cuvs",
    "faiss-gpu",
)


_CPU_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_tile", "fma"}


def environment(device: str | None = None) -> dict:
    """What this process computes with: package versions, the CPU (and the kernels torch picked for it),
    torch's threads and, when `device` is a CUDA device, that GPU (never asked otherwise: a driver that
    asked would take a CUDA context). ERM trained on a CPU gives other weights on another CPU or torch
    build, so results record it (results.json "environment"; the ERM stage records its rank-0 worker's)."""
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
    on_cuda = str(device).startswith("cuda")
    flags = sorted(set(info.get("flags", "").split()) & _CPU_FLAGS)
    return {
        "python": platform.python_version(),
        "packages": versions,
        "cpu": cpu,
        "cpu_flags": flags,
        "torch_cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if on_cuda else None,
        "device": device or "cpu",
        "fake_cuda": fake_cuda() if device is not None else False,
        "tf32": bool(torch.backends.cudnn.allow_tf32) if on_cuda else None,
        "host": platform.node(),
    }


def describe_environment(env: dict | None) -> str:
    """One line for a table's footer: packages, then where (GPU, or CPU with torch's kernels and threads)."""
    if not env:
        return "not recorded (computed by an older exmap-ray)"
    pk = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items())
    where = env.get("gpu") or (
        f"{env.get('cpu')} ({env.get('torch_cpu_kernels')} kernels, {env.get('torch_threads')} thread(s))"
    )
    return f"{pk}; on {where}"
