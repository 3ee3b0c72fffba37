"""Sharded heatmap extraction: a pure core, an on-disk shard store, and a Ray actor pool.

Layout of a heatmap stage folder:
    shard-00000.npy   heatmaps of images [0, shard_size), float32 (n, C', d, d)
    pred-00000.npy    the predicted class explained for each of them
    feat-00000.npy    their penultimate features, float32 (n, d), from the forward the heatmaps came from
    logit-00000.npy   their logits, float32 (n, n_classes), from that forward too
    ...
    index.json        shard list with ranges, shape and dtype (written after every shard)
    done              the stage marker (written by the stage cache, last)

Each shard is written atomically by the actor that computed it, straight to the
storage root (a local folder or a URI), so neither the driver's memory nor its
disk is in the path; `HeatmapShards` memory-maps shards back (remote shards via
the node-local derived cache). The val features and logits are the stage's too
(`HeatmapShards.features()`, `.logits()`): val is read and forwarded once, by the
actors, and the features stage does test only (heatmaps/method.py says what the
features are under bf16).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from ..console import Progress
from ..errors import DataError, UserError
from ..storage import Loc
from ..storage import load_npy, read_json, save_npy, write_json
from . import HEATMAP_METHODS
from .method import with_features

log = logging.getLogger(__name__)


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def extract(
    method,
    images: Dataset,
    batch_size: int,
    downsize: int | None,
    device: str = "cpu",
    loader_kwargs: dict | None = None,
) -> tuple[np.ndarray, ...]:
    """Heatmaps of `images` by a built method: (N, C', d, d) float32, predictions (N,), and the
    penultimate features (N, d) and logits (N, n_classes) of the same forward (float32; the method's
    `explain`, see method.py).

    Downsizing (bilinear, as the paper) happens on the device, before the copy to the host.
    `loader_kwargs` (workers, pinned memory) come from `data.base.loader_options(spec.dataset,
    persistent=False)`: decoding on-disk images in loader workers keeps a GPU busy.
    """
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, **(loader_kwargs or {}))
    return extract_batches(method, loader, downsize, device)


def extract_batches(method, batches, downsize: int | None, device: str = "cpu") -> tuple[np.ndarray, ...]:
    """`extract` over an iterable of image batches (an actor's one DataLoader, reused for every shard)."""
    maps, preds, feats, logits = [], [], [], []
    for x in batches:
        x = x.to(device, non_blocking=True)
        rel, pred, f, out = method.explain(x)
        if f is None:
            raise UserError(
                f"heatmaps: the model gives no penultimate features (not a timm model with "
                f"forward_features, forward_head and get_classifier): {type(method).__name__}"
            )
        feats.append(f.float().cpu())
        logits.append(out.float().cpu())
        if downsize and rel.shape[-1] != downsize:
            rel = F.interpolate(rel, size=(downsize, downsize), mode="bilinear", align_corners=False)
        maps.append(rel.float().cpu())
        preds.append(pred.cpu())
    return (
        torch.cat(maps).numpy(),
        torch.cat(preds).numpy().astype(np.int64),
        torch.cat(feats).numpy(),
        torch.cat(logits).numpy(),
    )


class HeatmapShards:
    """Read side of a heatmap stage folder (a local folder or a prefix under a storage URI).

    Shards of a remote store are read through the node-local derived cache, then memory-mapped.
    A float16 store (heatmaps.store_dtype) holds each heatmap divided by its max |value|, with that
    scale beside it in float32: readers get the heatmaps back in float32, one shard at a time.
    """

    def __init__(self, folder):
        self.dir = Loc.parse(folder)
        self.index = read_json(self.dir / "index.json")

    def __len__(self) -> int:
        return self.index["n"]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.index["n"], *self.index["item_shape"])

    @property
    def dtype(self) -> str:
        return self.index.get("dtype", "float32")

    def _shard(self, s: dict, scaled: bool = True) -> np.ndarray:
        maps = load_npy(self.dir / s["file"], mmap=True)
        if "scale_file" not in s or not scaled:
            return maps
        scale = load_npy(self.dir / s["scale_file"]).reshape((-1,) + (1,) * (maps.ndim - 1))
        return np.asarray(maps, np.float32) * scale

    def shards(self) -> Iterator[np.ndarray]:
        """Each shard's heatmaps: memory-mapped float32, or (float16 store) one shard scaled back to float32."""
        for s in self.index["shards"]:
            yield self._shard(s)

    def __getitem__(self, i: int) -> np.ndarray:
        """One heatmap by its val index, read from its (memory-mapped) shard: plots need a few, not all."""
        for s in self.index["shards"]:
            if s["start"] <= i < s["stop"]:
                maps = load_npy(self.dir / s["file"], mmap=True)
                one = np.asarray(maps[i - s["start"]], np.float32)
                if "scale_file" in s:
                    one = one * load_npy(self.dir / s["scale_file"])[i - s["start"]]
                return one
        raise IndexError(f"heatmap {i} is not in this store ({len(self)} heatmaps)")

    def for_clustering(self, whole_below: int, normalized: bool = False):
        """What the clusterer reads: one array below `whole_below` heatmaps (the exact path, unchanged),
        else the memory-mapped shards themselves, which the scalable path streams without a copy.

        `normalized`: the clusterer divides each row by its max |value| itself, so a float16 store's
        shards are handed over as stored (already so divided), memory-mapped, without the scale."""
        if len(self) < whole_below:
            return self.load()
        return [self._shard(s, scaled=not normalized) for s in self.index["shards"]]

    def load(self) -> np.ndarray:
        return (
            np.concatenate([np.asarray(a, np.float32) for a in self.shards()])
            if self.index["shards"]
            else np.zeros(self.shape, np.float32)
        )

    def preds(self) -> np.ndarray:
        return np.concatenate([load_npy(self.dir / s["pred_file"]) for s in self.index["shards"]])

    @property
    def has_features(self) -> bool:
        """Whether the actors kept the features and logits of their forward (every store made since they do)."""
        return all("features_file" in s for s in self.index["shards"])

    def _concat(self, key: str, what: str) -> np.ndarray:
        if not self.has_features:
            raise DataError(
                f"heatmap store '{self.dir}' holds no val {what}: it was written before the heatmaps "
                f"stage kept the features and logits of its forward. Its stage key predates them, so "
                f"a run never reads it; delete the folder, or run again to compute the current stage"
            )
        if not self.index["shards"]:
            return np.zeros((0, 0), np.float32)
        return np.concatenate([load_npy(self.dir / s[key]) for s in self.index["shards"]])

    def features(self) -> np.ndarray:
        """(N, d) float32: the val penultimate features of the forward the heatmaps came from."""
        return self._concat("features_file", "features")

    def logits(self) -> np.ndarray:
        """(N, n_classes) float32: the val logits of that forward."""
        return self._concat("logits_file", "logits")


STORE_DTYPES = ("float32", "float16")


def write_shard(
    folder,
    shard_id: int,
    start: int,
    stop: int,
    maps: np.ndarray,
    preds: np.ndarray,
    dtype: str = "float32",
    features: np.ndarray | None = None,
    logits: np.ndarray | None = None,
) -> dict:
    """Write one shard (maps, predictions, then features and logits when given) under `folder` (a Loc
    or a local path).

    float16: each heatmap is divided by its max |value| first (so none overflows float16's 65504 or
    sinks below its 6e-8), and the divisors are written as float32 beside it. Features and logits
    are always float32."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"heatmap store dtype '{dtype}': expected one of {', '.join(STORE_DTYPES)}")
    folder = Loc.parse(folder)
    name = f"shard-{shard_id:05d}.npy"
    entry = {
        "id": shard_id,
        "start": start,
        "stop": stop,
        "file": name,
        "pred_file": f"pred-{shard_id:05d}.npy",
        "item_shape": list(maps.shape[1:]),
    }
    maps, scale_bytes = maps.astype(np.float32, copy=False), 0
    if dtype == "float16":
        scale = np.abs(maps.reshape(len(maps), -1)).max(axis=1) if maps.size else np.zeros(0, np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        maps = (maps / scale.reshape((-1,) + (1,) * (maps.ndim - 1))).astype(np.float16)
        entry["scale_file"] = f"scale-{shard_id:05d}.npy"
        save_npy(folder / entry["scale_file"], scale)
        scale_bytes = scale.nbytes
    save_npy(folder / name, maps)
    save_npy(folder / entry["pred_file"], preds)
    extra = 0
    if features is not None:
        if logits is None or not len(features) == len(logits) == len(maps):
            raise ValueError(
                f"shard {shard_id}: features and logits must both be given, one row per heatmap "
                f"({len(maps)}); got {None if features is None else len(features)} and "
                f"{None if logits is None else len(logits)}"
            )
        features, logits = features.astype(np.float32, copy=False), logits.astype(np.float32, copy=False)
        entry["features_file"], entry["logits_file"] = f"feat-{shard_id:05d}.npy", f"logit-{shard_id:05d}.npy"
        save_npy(folder / entry["features_file"], features)
        save_npy(folder / entry["logits_file"], logits)
        extra = features.nbytes + logits.nbytes
    entry["bytes"] = int(maps.nbytes + preds.nbytes + scale_bytes + extra)
    return entry


def write_index(folder, n: int, entries: list[dict], dtype: str = "float32") -> None:
    entries = sorted(entries, key=lambda e: e["start"])
    covered = sum(e["stop"] - e["start"] for e in entries)
    if covered != n:
        raise RuntimeError(f"heatmap shards cover {covered} of {n} images; refusing to write an incomplete index")
    item_shape = entries[0]["item_shape"] if entries else []
    write_json(Loc.parse(folder) / "index.json", {"n": n, "item_shape": item_shape, "dtype": dtype, "shards": entries})


# ----------------------------------------------------------------------------- Ray wiring


class ShardBatches(Sampler):
    """The batches of one shard, [start, stop) in steps of `batch_size`: the one DataLoader of an actor
    takes its indices from here, so its loader workers (heatmaps use `dataset.loader_workers`) start once
    and serve every shard instead of being started again per shard."""

    def __init__(self, batch_size: int):
        self.batch_size, self.start, self.stop = batch_size, 0, 0

    def __iter__(self):
        for lo in range(self.start, self.stop, self.batch_size):
            yield list(range(lo, min(lo + self.batch_size, self.stop)))

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)


SHARDS_IN_FLIGHT = 2  # per actor: one computing, the one before it being written by the actor's second thread


class HeatmapWorker:
    """An extraction actor (1/heatmaps.actors_per_gpu of a GPU, or CPU threads): builds the val split, the
    model, the method and one DataLoader once.

    The model is read from the storage root and the shards are written there by the actor itself; only
    the shard's small index entry travels back to the driver. Its Ray actor runs two calls at once
    (max_concurrency=SHARDS_IN_FLIGHT): a lock lets one compute while the other writes its finished
    shard, so the GPU is not idle during the write. A trial that holds a GPU share runs the same class in
    its own process (`extract_with_actors`).
    """

    def __init__(self, spec_dict: dict, model_uri: str, out_uri: str, threads: int):
        from .. import quiet_worker_logs
        from ..data import build_dataset
        from ..data.base import loader_options
        from ..models import load_checkpoint
        from ..resources import stage_device, where_am_i
        from ..spec import from_dict

        quiet_worker_logs()
        self.error = None
        try:  # a user's error (a GPU mismatch, bad data) comes back from ready() as itself: exit 2
            torch.set_num_threads(max(1, threads))
            spec = from_dict(spec_dict)
            self.hspec = spec.heatmaps
            self.device = stage_device(spec, self.hspec.precision)  # Ray's GPU for this actor, or the CPU
            self.placement = where_am_i(self.device)
            self.out = Loc.parse(out_uri)
            data = build_dataset(spec.dataset, spec.seed)
            self.sampler = ShardBatches(self.hspec.batch_size)
            # workers and pinned memory from the spec; persistent: they serve every shard of this actor
            self.loader = DataLoader(
                data.val.images,
                batch_sampler=self.sampler,
                **loader_options(spec.dataset, persistent=True, device=self.device),
            )
            model = load_checkpoint(spec.model.backbone, data.n_classes, Loc.parse(model_uri)).to(self.device)
            self.method = with_features(
                HEATMAP_METHODS.get(self.hspec.method)(model, self.hspec), model, self.hspec.precision
            )
        except UserError as e:
            self.error = e
        self.lock = threading.Lock()

    def ready(self) -> dict:
        """Where this actor computes (node, Ray's GPU ids, torch device); raises its set-up error."""
        if self.error is not None:
            raise self.error
        return self.placement

    def run(self, shard_id: int, start: int, stop: int) -> dict:
        """One shard: heatmaps, and the val features and logits of the same forward; written after the lock
        is released, while the next shard computes."""
        with self.lock:
            self.sampler.start, self.sampler.stop = start, stop
            maps, preds, feats, logits = extract_batches(self.method, self.loader, self.hspec.downsize, self.device)
        return write_shard(self.out, shard_id, start, stop, maps, preds, self.hspec.store_dtype, feats, logits)


def _extract_here(spec, checkpoint, ranges: list, out) -> tuple[list[dict], dict]:
    """Every shard in this process, on the GPU share Ray gave it (a Tune trial holding search.trial_gpus):
    asking for actors of their own could wait for ever on GPUs that trials hold. Two threads, as in an
    actor: one computes while the other writes."""
    from concurrent.futures import ThreadPoolExecutor

    worker = HeatmapWorker(spec.to_dict(), str(checkpoint), str(out), torch.get_num_threads())
    placement = worker.ready()
    with ThreadPoolExecutor(SHARDS_IN_FLIGHT) as pool:
        entries = list(pool.map(lambda t: worker.run(*t), [(i, a, b) for i, (a, b) in enumerate(ranges)]))
    return entries, placement


def actor_options(spec, n_shards: int) -> tuple[int, dict, int]:
    """(actors, their Ray options, torch threads each) for a heatmaps stage of `n_shards` shards.

    On a GPU run each actor asks 1/heatmaps.actors_per_gpu of a GPU; without heatmaps.num_actors there are
    actors_per_gpu per GPU the run asked for (erm.num_workers, what resources.gpu auto requested) or per GPU
    present, whichever is more: actors that find no GPU yet wait, and start as GPU nodes join."""
    import ray

    hspec = spec.heatmaps
    if spec.resources.gpu is True:
        gpus = max(int(ray.cluster_resources().get("GPU", 0)), spec.erm.num_workers, 1)
        n_actors = hspec.num_actors or gpus * hspec.actors_per_gpu
        options, threads = {"num_gpus": 1.0 / hspec.actors_per_gpu, "num_cpus": 1}, 1
    else:
        from ..resources import cpus_per_worker

        cpus = int(ray.available_resources().get("CPU", 1)) or 1
        n_actors = hspec.num_actors or min(2, cpus)
        threads = cpus_per_worker(n_actors, spec)
        options = {"num_cpus": threads}
    # "DEFAULT" keeps the actors out of a Tune trial's placement group: inside a trial, Ray would
    # otherwise try to fit them into the trial's small bundle and refuse
    options.update(scheduling_strategy="DEFAULT", max_concurrency=SHARDS_IN_FLIGHT)
    return max(1, min(n_actors, n_shards)), options, threads


def extract_with_actors(spec, checkpoint, n_images: int, out) -> dict:
    """Shard the val split over a pool of Ray actors, which read the model at `checkpoint` and write
    their shards under `out` (both storage locations); the driver writes the index last.

    On a GPU run each actor asks for 1/heatmaps.actors_per_gpu of a GPU; a caller that holds a GPU share
    itself (a trial with search.trial_gpus) extracts in its own process on that share instead."""
    import ray

    from ..resources import holds_gpu

    hspec = spec.heatmaps
    ranges = shard_ranges(n_images, hspec.shard_size)
    on_gpu = spec.resources.gpu is True  # from the spec (resolved once per run), not the cluster's state now
    if on_gpu and holds_gpu():
        log.info(
            "heatmaps: %s on %d images, %d shards in this process, on its own GPU share",
            hspec.method,
            n_images,
            len(ranges),
        )
        entries, placement = _extract_here(spec, checkpoint, ranges, out)
        write_index(out, n_images, entries, hspec.store_dtype)
        return {
            "n": n_images,
            "shards": len(entries),
            "actors": 0,
            "actors_lost": 0,
            "actors_started": 0,
            "device": "cuda",
            "placements": [placement],
            "bytes_written": sum(e["bytes"] for e in entries),
        }
    n_actors, options, threads = actor_options(spec, len(ranges))
    log.info(
        "heatmaps: %s on %d images, %d shards over %d actor(s) (%s)",
        hspec.method,
        n_images,
        len(ranges),
        n_actors,
        f"{options['num_gpus']:g} GPU each" if on_gpu else f"{threads} CPU thread(s) each",
    )
    Worker = ray.remote(HeatmapWorker).options(**options)
    make = lambda: Worker.remote(spec.to_dict(), str(checkpoint), str(out), threads)  # noqa: E731
    actors = [make() for _ in range(n_actors)]
    starting = {a.ready.remote(): a for a in actors}
    free, running, entries, placements = [], {}, [], []
    work = deque((i, a, b) for i, (a, b) in enumerate(ranges))
    lost, max_lost = 0, max(3, 2 * n_actors)
    t0 = None

    def replace(actor, err) -> None:
        """An actor died (node lost, OOM, killed): start another in its place, up to `max_lost` times; its
        other shard in flight comes back with the same error and is requeued without a second replacement."""
        nonlocal lost
        if actor not in actors:
            return
        lost += 1
        actors.remove(actor)
        free[:] = [a for a in free if a is not actor]
        if lost > max_lost:
            raise RuntimeError(f"heatmap extraction lost {lost} actors (last: {err}); giving up") from err
        log.warning(
            "heatmaps: an actor died (%s); its shards go back in the queue and a new actor replaces it (%d/%d)",
            type(err).__name__,
            lost,
            max_lost,
        )
        new = make()
        actors.append(new)
        starting[new.ready.remote()] = new

    # Work goes only to actors that are up (two shards each at most: backpressure), so extraction goes on
    # as soon as one actor runs. Every actor needs only its own resources and frees them when the stage
    # ends; a trial holding a GPU share extracts in its own process (above). So a stage waits on GPUs that
    # other stages' actors or tasks hold, which they free, never on a GPU that a waiting trial holds.
    try:
        with Progress("heatmaps", len(ranges), "shard") as bar:
            while work or running:
                while free and work:
                    actor, task = free.pop(), work.popleft()
                    running[actor.run.remote(*task)] = (actor, task)
                (ref,), _ = ray.wait(list(running) + list(starting), num_returns=1)
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        placements.append(ray.get(ref))
                    except ray.exceptions.RayTaskError as e:  # its set-up failed: a user's error, as is
                        raise (e.cause if isinstance(e.cause, UserError) else e) from None
                    except ray.exceptions.RayActorError as e:
                        if getattr(e, "actor_init_failed", False):
                            raise  # its __init__ raised: a bug, which a new actor would repeat
                        replace(actor, e)
                        continue
                    free.extend([actor] * SHARDS_IN_FLIGHT)
                    t0 = t0 or time.perf_counter()  # the rate counts from the first actor up
                    continue
                actor, task = running.pop(ref)
                try:
                    entry = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the actor's own error (a full disk, bad data): as is
                    raise (e.cause if isinstance(e.cause, UserError) else e) from None
                except ray.exceptions.RayActorError as e:
                    work.appendleft(task)  # redone by another actor; its index entry was never returned
                    replace(actor, e)
                    continue
                free.append(actor)
                entries.append(entry)
                done = sum(e["stop"] - e["start"] for e in entries)
                numbers = f"{done}/{n_images} images, {done / max(time.perf_counter() - t0, 1e-9):.0f} img/s"
                bar.step(1, f"shard {len(entries)}/{len(ranges)}: {numbers}", numbers)
    finally:  # done or failed: the actors go, which also withdraws the requests of those never started
        for a in actors:
            ray.kill(a)
    write_index(out, n_images, entries, spec.heatmaps.store_dtype)
    return {
        "n": n_images,
        "shards": len(entries),
        "actors": n_actors,
        "actors_lost": lost,
        "actors_started": len(actors) - len(starting),
        "device": "cuda" if on_gpu else "cpu",
        "placements": placements,
        "bytes_written": sum(e["bytes"] for e in entries),
    }
