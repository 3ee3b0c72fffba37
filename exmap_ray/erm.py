"""ERM training: a plain PyTorch loop, run by Ray Train's TorchTrainer.

    exmap-ray run cmnist --set erm.num_workers=2   # DDP over gloo on a CPU

- One Ray Train worker per GPU (NCCL; `erm.worker_gpus` below 1 shares a GPU
  between workers, over gloo) where the spec resolved resources.gpu to true,
  else CPU workers over gloo, each given an equal share of the CPUs. Each
  worker's device is the GPU Ray assigned it (`resources.stage_device`).
- Batches are copied to the GPU by `_batch` (pinned memory, non_blocking):
  Ray's `prepare_data_loader` is told not to move them itself, which would
  make a blocking copy of its own first.
- Every epoch ends with `ray.train.report(metrics, checkpoint)`: the model,
  optimizer and history (and, with `erm.keep: best_val_acc`, the best-val-accuracy
  weights so far). A restarted worker group resumes from the last checkpoint
  instead of epoch 0; Ray keeps only the last CHECKPOINTS_KEPT of them.
- Validation is sharded over the workers (each scores every world-th image) and
  the counts are all-reduced, so val accuracy is the same as one worker's.
- `erm.precision` (bf16 autocast; auto = on CUDA), `erm.channels_last` and
  `erm.compile` are the GPU speed options; their defaults leave CPU runs as they were.
- Only class labels are used: the true groups never reach this stage.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Subset

from .models import autocast, create_model, save_checkpoint
from .hashing import stage_seed
from .storage import Loc
from .storage import read_json, write_json

log = logging.getLogger(__name__)
CHECKPOINTS_KEPT = 2  # the last two: a worker lost while one is being written still leaves a whole one


def _batch(x, y, device, channels_last: bool):
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def train_epoch(model: nn.Module, loader, opt, device, precision: str = "fp32", channels_last: bool = False) -> dict:
    """One pass over `loader`. Loss and accuracy are summed on the device (no host sync per batch)."""
    model.train()
    device = torch.device(device)
    total, t0 = 0, time.perf_counter()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = _batch(x, y, device, channels_last)
        with autocast(device.type, precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += len(y)
        correct += (logits.argmax(1) == y).sum()
        loss_sum += loss.detach().double() * len(y)
    correct, loss_sum = int(correct), float(loss_sum)  # one sync, which also ends the timed epoch
    dt = time.perf_counter() - t0
    return {
        "train_loss": loss_sum / max(total, 1),
        "train_acc": correct / max(total, 1),
        "images_per_s": total / max(dt, 1e-9),
        "train_s": dt,
    }


@torch.no_grad()
def accuracy(model: nn.Module, loader, device, precision: str = "fp32", channels_last: bool = False) -> float:
    """Accuracy over `loader` (batches may already be on the device), summed over all ranks when
    torch.distributed runs more than one: each rank then passes its own shard of the data."""
    import torch.distributed as dist

    model.eval()
    device = torch.device(device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, total
    for x, y in loader:
        x, y = _batch(x, y, device, channels_last)
        with autocast(device.type, precision):
            counts[0] += (model(x).argmax(1) == y).sum()
        counts[1] += len(y)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    correct, total = counts.tolist()
    return correct / max(total, 1)


def make_optimizer(params, e):
    if e.optimizer == "sgd":
        return torch.optim.SGD(params, lr=e.lr, momentum=e.momentum, weight_decay=e.weight_decay)
    return torch.optim.AdamW(params, lr=e.lr, weight_decay=e.weight_decay)


def epoch_lr(e, epoch: int) -> float:
    """The learning rate of epoch `epoch` (0-based): constant, or cosine from erm.lr down towards 0."""
    if e.lr_schedule == "cosine":
        return 0.5 * e.lr * (1.0 + math.cos(math.pi * epoch / e.epochs))
    return e.lr


def train_loop(config: dict) -> None:
    """Ray Train per-worker entry point."""
    import ray.train
    import ray.train.torch

    from . import quiet_worker_logs
    from .console import post
    from .data import build_dataset
    from .data.base import Labeled, loader_options
    from .resources import environment, stage_device
    from .spec import from_dict

    quiet_worker_logs()
    spec = from_dict(config["spec"])
    torch.set_num_threads(config["threads"])
    device = torch.device(stage_device(spec, spec.erm.precision))  # Ray's GPU for this worker, or the CPU
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(stage_seed(spec.seed, "erm"))  # same init on every worker; DDP also broadcasts it
    data = build_dataset(spec.dataset, spec.seed)
    e = spec.erm
    g = torch.Generator().manual_seed(stage_seed(spec.seed, "erm-shuffle"))
    opts = loader_options(spec.dataset, device=str(device))  # workers, pinned memory, persistent workers
    world = ctx.get_world_size()
    # our own DistributedSampler: Ray's prepare_data_loader would rebuild the loader without persistent_workers
    sampler = (
        DistributedSampler(
            Labeled(data.train), num_replicas=world, rank=rank, shuffle=True, seed=stage_seed(spec.seed, "erm-shuffle")
        )
        if world > 1
        else None
    )
    train = DataLoader(
        Labeled(data.train),
        batch_size=e.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=g if sampler is None else None,
        **opts,
    )
    # each rank scores every world-th val image; accuracy() all-reduces the counts
    val = DataLoader(
        Subset(Labeled(data.val), range(rank, len(data.val), world)), batch_size=512, shuffle=False, **opts
    )
    # move_to_device=False: _batch makes the pinned, non_blocking copy; Ray's own would block first
    train = ray.train.torch.prepare_data_loader(train, add_dist_sampler=False, move_to_device=False)
    val = ray.train.torch.prepare_data_loader(val, add_dist_sampler=False, move_to_device=False)
    net = create_model(spec.model.backbone, data.n_classes, spec.model.pretrained)
    if e.channels_last:
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net, move_to_device=device)
    opt = make_optimizer(model.parameters(), e)
    if e.compile:
        model = torch.compile(model)
    amp = {"precision": e.precision, "channels_last": e.channels_last}
    start, history = 0, []
    env = None
    if rank == 0:  # what the weights were computed with, and where (results.json)
        from .resources import where_am_i

        env = {**environment(str(device)), "placement": where_am_i(str(device)), "backend": config.get("backend")}
    best = {"val_acc": -1.0, "epoch": -1, "model": None}  # erm.keep best_val_acc: the best weights so far
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resumed after a failure: continue where the last report left off
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
            _unwrap(model).load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, history = state["epoch"] + 1, read_json(Path(d) / "history.json")
            best = state.get("best", best)
        log.info("ERM: resumed from checkpoint after epoch %d", start)
    for epoch in range(start, e.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every worker
        for group in opt.param_groups:  # a function of the epoch, so a resumed run gets the same rate
            group["lr"] = epoch_lr(e, epoch)
        metrics = train_epoch(model, train, opt, device, **amp)
        t_val = time.perf_counter()
        metrics.update(epoch=epoch + 1, val_acc=accuracy(model, val, device, **amp), resumed_from=start)
        # where an epoch's time went (benchmarks/erm_bound.py): training, validation, and, from the driver's
        # clock, how long after fit() began this worker had its first epoch done
        metrics.update(val_s=time.perf_counter() - t_val, since_fit_s=time.time() - config.get("fit_t0", time.time()))
        history.append(metrics)
        if e.keep == "best_val_acc" and rank == 0 and metrics["val_acc"] > best["val_acc"]:  # the first best wins
            best = {
                "val_acc": metrics["val_acc"],
                "epoch": epoch,
                "model": {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()},
            }
        if rank == 0:
            post(config.get("progress"), metrics)  # the driver prints the epoch (console.py)
            with tempfile.TemporaryDirectory() as d:
                state = {
                    "model": _unwrap(model).state_dict(),
                    "opt": opt.state_dict(),
                    "epoch": epoch,
                    "environment": env,
                }
                if e.keep == "best_val_acc":
                    state["best"] = best
                torch.save(state, Path(d) / "state.pt")
                write_json(Path(d) / "history.json", history)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def dist_backend(spec) -> str:
    """The collective backend of ERM's workers: NCCL when each has a GPU of its own; gloo on CPUs, when
    workers share a GPU (NCCL refuses two ranks on one device; gloo all-reduces their CUDA tensors through
    the host) and under the test-only EXMAP_RAY_FAKE_CUDA (CPU tensors)."""
    from .resources import fake_cuda

    if spec.resources.gpu is not True or fake_cuda():
        return "gloo"
    return "gloo" if spec.erm.worker_gpus < 1 and spec.erm.num_workers > 1 else "nccl"


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


def train_erm(spec, out, n_classes: int) -> dict:
    """Run ERM on the connected Ray cluster; writes out/model.pt and out/history.json (`out`: a storage Loc)."""
    from ray.train import Checkpoint

    from . import console

    e = spec.erm
    from .resources import cpus_per_worker, resolve_resources

    spec = resolve_resources(spec)
    use_gpu = spec.resources.gpu is True  # from the spec, decided once per run
    threads = 1 if use_gpu else cpus_per_worker(e.num_workers, spec)
    backend = dist_backend(spec)
    log.info(
        "ERM: %s, %d epoch(s), %d worker(s) on %s",
        spec.model.backbone,
        e.epochs,
        e.num_workers,
        f"GPU ({e.worker_gpus:g} each, {backend})" if use_gpu else f"CPU (gloo, {threads} thread(s) each)",
    )
    out = Loc.parse(out)
    train_dir = out / "ray_train"
    with (
        console.Progress("erm", e.epochs, "epoch") as bar,
        console.mailbox(_epoch_printer(bar, e.epochs, e.num_workers), wanted=bar.shown) as box,
    ):
        try:
            result = _fit(spec, train_dir, use_gpu, threads, box, backend)
        except Exception:
            if use_gpu:  # a GPU node whose torch sees no CUDA fails inside Ray Train's set-up: say which, exit 2
                from .resources import check_gpu_nodes

                check_gpu_nodes(spec, force=True)
            raise
    ckpt: Checkpoint | None = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"ERM finished without a checkpoint (error: {result.error})")
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        history = read_json(Path(d) / "history.json")
    model = create_model(spec.model.backbone, n_classes)
    kept = state["best"] if e.keep == "best_val_acc" else state  # erm.keep
    model.load_state_dict(kept["model"])
    save_checkpoint(model, out / "model.pt")
    write_json(out / "history.json", history)
    train_dir.rmtree()  # model.pt is the stage's artifact
    return {
        "epochs": len(history),
        "history": history,
        "workers": e.num_workers,
        "use_gpu": use_gpu,
        "kept_epoch": kept["epoch"] + 1,
        "environment": state.get("environment"),
    }


def _fit(spec, train_dir: Loc, use_gpu: bool, threads: int, progress, backend: str):
    """Ray Train's fit; `progress` (a console.Mailbox or None) gets each epoch's metrics from rank 0."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .console import verbose

    e = spec.erm
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "spec": spec.to_dict(),
            "threads": threads,
            "progress": progress,
            "backend": backend,
            "fit_t0": time.time(),
        },
        scaling_config=ScalingConfig(
            num_workers=e.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": 1, "GPU": e.worker_gpus} if use_gpu else {"CPU": threads},
        ),
        torch_config=TorchConfig(backend=backend),
        # checkpoints go to the storage root, which every node can reach (a URI on a cluster)
        run_config=RunConfig(
            name="erm",
            storage_path=train_dir.fs_path,
            storage_filesystem=train_dir.fs,
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            # Ray Train's per-report INFO lines under -v only: the driver prints the epochs
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )
    return trainer.fit()


def _epoch_printer(bar, epochs: int, workers: int):
    """What the driver does with an epoch's metrics from rank 0: a line (or the bar's step) of its own."""
    seen = {"epoch": 0, "resumed_from": 0}

    def show(m: dict) -> None:
        resumed = ""
        if m.get("resumed_from", 0) != seen["resumed_from"]:  # a (re)started worker group, from a checkpoint
            seen["resumed_from"] = m["resumed_from"]
            resumed = f" (resumed from the checkpoint of epoch {m['resumed_from']})"
        rate = f"{m['images_per_s']:.0f} img/s" + (" per worker" if workers > 1 else "")
        numbers = f"loss {m['train_loss']:.4f}, train acc {m['train_acc']:.3f}, val acc {m['val_acc']:.3f}, {rate}"
        line = f"epoch {m['epoch']}/{epochs}: {numbers}{resumed}"
        bar.step(max(0, m["epoch"] - seen["epoch"]), line, numbers)
        seen["epoch"] = max(seen["epoch"], m["epoch"])

    return show
