"""The stage graph: every cached stage declared once, and the one function stage keys come from.

    from exmap_ray.stages import compute_upstream, stage_keys
    stages = stage_keys(spec, cache)         # {name: Stage}: the key and folder of each stage of this spec
    up = compute_upstream(spec, data, cache)  # computes (or reuses) them all; needs ray.init() first
    up.val_features, up.pseudo, up.stages["heatmaps"].dir

    erm ──> features (test: features, logits)
     │ └──> heatmaps (val: heatmaps, features, logits) ──> clusters
     └────────────────────────────────────────────────────────┴──> end_to_end  (retrain.mode end_to_end only)

Val is read and forwarded once: the heatmap actors keep the penultimate features and logits of
the forward their heatmaps come from (heatmaps/method.py), and the features stage embeds test only.

Each `StageDef` in `STAGES` names its inputs, the spec sections its key hashes, its compute
function and where it runs. A stage's key is the hash of its name, those sections (less the
execution-only keys, plus the resolved device and any values its `extra` computes from the spec)
and its inputs' keys (`cache.StageCache.stage`), so a change to a section recomputes that stage and
everything downstream of it, and nothing else.
`run_pipeline`, `bench`, the sweep's shared upstream (`shared_stages`) and the benchmarks derive
from this table; a new stage is one entry here and its compute function.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Optional

import numpy as np

from .data import GroupData, build_dataset
from .data.base import loader_options
from . import legacy
from .console import tagged
from .errors import DataError
from .groups import GroupContext, infer_groups
from .groups.formation import check_heatmaps
from .heatmaps.extract import HeatmapShards, extract_with_actors
from .models import embed, load_checkpoint, resolved_precision
from .clustering.device import clustering_device
from .resources import cpus_per_worker, resolve_resources, run_task, stage_device, where_am_i
from .options import hashed
from .hashing import RETRAIN_SEED
from .spec import Spec, stage_seed
from .storage import Loc
from .cache import Stage, StageCache
from .storage import load_npy, save_npy

log = logging.getLogger(__name__)


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        """Time stage `name`; every log line inside it says "[name]" (console.tagged)."""
        with tagged(name):
            log.info("stage started")
            t0 = time.perf_counter()
            yield
            self.seconds[name] = round(time.perf_counter() - t0, 3)
            log.info("stage done in %.1f s", self.seconds[name])


# compute(spec, data, inputs, out): writes the stage's files under `out` (a storage Loc) and returns
# the JSON-able info its `done` marker records; `inputs` are the finished input stages, by name
Compute = Callable[[Spec, GroupData, "dict[str, Stage]", Loc], Optional[dict]]


@dataclass(frozen=True)
class StageDef:
    name: str
    inputs: tuple[str, ...]  # upstream stages, by name (declared earlier in STAGES)
    sections: tuple[str, ...]  # spec sections (or top-level keys such as seed) its key hashes
    compute: Compute
    resources: str  # where it runs, and the spec keys that size it (docs, logs)
    device: bool = True  # the key also hashes the resolved device (resources.gpu)
    when: Optional[Callable[[Spec], bool]] = None  # the stage runs only for specs where this holds
    extra: Optional[Callable[["Spec"], dict]] = None  # more of the spec its key hashes, as computed values
    extra_keys: tuple[str, ...] = ()  # the dotted spec keys `extra` reads (`changes` answers for them)

    def applies(self, spec: Spec) -> bool:
        return self.when is None or self.when(spec)


def device(spec: Spec) -> str:
    """Part of every compute stage's key: resources.gpu as resolved for this run (never 'auto')."""
    if spec.resources.gpu == "auto":
        raise RuntimeError("resources.gpu must be resolved (resources.resolve_resources) before stage keys")
    return "cuda" if spec.resources.gpu else "cpu"


def section_config(spec: Spec, section: str):
    """A spec section as a stage key hashes it (or a top-level value): each key where `options.hashed`
    says so (never an execution-only key; a key with a neutral value only away from it), whether the
    spec declares it or a plugin beside its code. The old forms some keys keep are legacy.py's."""
    value = getattr(spec, section)
    if not dataclasses.is_dataclass(value):
        return value
    if section == "retrain":
        return legacy.retrain_config(value)
    config = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if hashed(f, getattr(value, f.name))}
    return {**legacy.LEGACY_DATASET_KEYS, **config} if section == "dataset" else config


def execution_only(section: str) -> set[str]:
    """The keys of `section` that change how a stage runs, not what it computes (`opt(execution=True)`)."""
    value = getattr(Spec(), section)
    return (
        {f.name for f in dataclasses.fields(value) if f.metadata.get("execution")}
        if dataclasses.is_dataclass(value)
        else set()
    )


def stage_config(sd: StageDef, spec: Spec) -> dict:
    """What stage `sd`'s key hashes of `spec` (besides its inputs' keys), in the form its key has always had."""
    config = {s: section_config(spec, s) for s in sd.sections}
    if sd.device:
        config["device"] = device(spec)
    if sd.extra is not None:
        config.update(sd.extra(spec))
    return legacy.key_form(sd.name, config)


# ── compute functions ────────────────────────────────────────────────────────────────────────────


def _erm(spec: Spec, data: GroupData, inputs: dict[str, Stage], out: Loc) -> dict:
    from .erm import train_erm

    return train_erm(spec, out, data.n_classes)


def features_task(spec_dict: dict, model_uri: str, out_uri: str) -> dict:
    """Penultimate features and logits of test, written under `out_uri` (a Ray task). Val's come from
    the heatmaps stage, out of the forward its heatmaps come from; test's from a forward in the same
    precision (heatmaps.precision), so DFR fits on val and is scored on test features of one kind."""
    from .spec import from_dict

    spec = from_dict(spec_dict)
    dev = stage_device(spec)  # first: a GPU mismatch stops the task before any work
    data = build_dataset(spec.dataset, spec.seed)
    out = Loc.parse(out_uri)
    model = load_checkpoint(spec.model.backbone, data.n_classes, Loc.parse(model_uri))
    f, logits = embed(
        model,
        data.test.images,
        device=dev,
        precision=spec.heatmaps.precision,
        loader_kwargs=loader_options(spec.dataset, persistent=False, device=dev),
    )
    save_npy(out / "test_features.npy", f)
    save_npy(out / "test_logits.npy", logits)
    return {"dim": int(f.shape[1]), "splits": ["test"], "placement": where_am_i(dev)}


def features_precision_key(spec: Spec) -> dict:
    """The features stage's precision, hashed only where it is not what 'auto' gives on this device:
    the stage embedded test with 'auto' before it followed heatmaps.precision, so every key made then
    (auto on either device, fp32 on the CPU, bf16 on a GPU) stays valid."""
    dev = device(spec)
    p = resolved_precision(dev, spec.heatmaps.precision)
    return {} if p == resolved_precision(dev, "auto") else {"precision": p}


def _features(spec: Spec, data: GroupData, inputs: dict[str, Stage], out: Loc) -> dict:
    return run_task(spec, features_task, spec.to_dict(), str(inputs["erm"].dir / "model.pt"), str(out))


def _heatmaps(spec: Spec, data: GroupData, inputs: dict[str, Stage], out: Loc) -> dict:
    return extract_with_actors(spec, inputs["erm"].dir / "model.pt", len(data.val), out)


def group_context(
    spec: Spec,
    y_val: np.ndarray,
    true_groups: np.ndarray,
    val_features: np.ndarray,
    val_logits: np.ndarray,
    heatmaps,
    scope: str | None = None,
) -> GroupContext:
    """What the spec's group sources see (`scope` overrides clustering.scope: bench's local/global rows)."""
    clustering = spec.clustering if scope is None else dataclasses.replace(spec.clustering, scope=scope)
    return GroupContext(
        y_val=y_val,
        clustering=clustering,
        seed=stage_seed(spec.seed, "clusters"),
        val_features=val_features,
        val_logits=val_logits,
        heatmaps=heatmaps,
        true_groups=true_groups,
        random_k=spec.groups.random_k,
        merge_easy=spec.groups.merge_easy,
        split_ica=spec.groups.split_ica,
    )


def clusters_task(spec_dict: dict, hm_uri: str, out_uri: str, y_val: np.ndarray, true_groups: np.ndarray) -> dict:
    """The val grouping retraining uses (ExMap's heatmap clusters, or a baseline), as a Ray task. The val
    features and logits (feature clusters, JTT's error set) are the heatmaps stage's."""
    from .clustering import SCALE_MIN_N
    from .spec import from_dict

    spec = from_dict(spec_dict)
    dev = stage_device(spec)
    hm = Loc.parse(hm_uri)
    store = HeatmapShards(hm)
    # millions: shards, memory-mapped (a float16 store's as stored, when the clusterer normalises anyway)
    H = store.for_clustering(whole_below=SCALE_MIN_N, normalized=spec.clustering.normalize)
    if spec.groups.source == "exmap" and spec.clustering.input in ("heatmaps", "both"):
        try:
            check_heatmaps(H)
        except DataError as e:  # name the culprit stage: which method, which files
            raise DataError(
                f"{e} [heatmaps.method '{spec.heatmaps.method}', backbone '{spec.model.backbone}', heatmaps in '{hm}']"
            ) from None
    ctx = group_context(spec, y_val, true_groups, store.features(), store.logits(), H)
    # the route from the key (resources.gpu), the device from Ray's assignment: never what FAISS sees here
    with clustering_device(dev if spec.resources.gpu is True else None):
        groups, info = infer_groups(spec.groups.source, ctx)  # only the `true` source sees true groups
    save_npy(Loc.parse(out_uri) / "pseudo_groups.npy", groups)
    return {**info, "placement": where_am_i(dev)}


def _clusters(spec: Spec, data: GroupData, inputs: dict[str, Stage], out: Loc) -> dict:
    return run_task(
        spec, clusters_task, spec.to_dict(), str(inputs["heatmaps"].dir), str(out), data.val.y, data.val.group
    )


def end_to_end_task(spec_dict: dict, model_uri: str, groups_uri: str, out_uri: str, threads: int) -> dict:
    """Fine-tune the ERM network (read at `model_uri`) with the pseudo groups at `groups_uri`, writing
    under `out_uri` (a Ray task: 1 GPU when resources.gpu, else `threads` CPU threads)."""
    import torch

    from .retrain.end_to_end import run_end_to_end
    from .spec import from_dict

    spec = from_dict(spec_dict)
    dev = stage_device(spec)
    here, before = where_am_i(dev), torch.get_num_threads()
    if here["ray_worker"]:  # a task (or a trial that holds these CPUs): its share, not every core
        torch.set_num_threads(max(1, threads))
    try:
        data = build_dataset(spec.dataset, spec.seed)
        model = load_checkpoint(spec.model.backbone, data.n_classes, Loc.parse(model_uri))
        info = run_end_to_end(
            spec,
            model,
            data.val.images,
            data.val.y,
            load_npy(Loc.parse(groups_uri)),
            data.test.images,
            stage_seed(spec.seed, RETRAIN_SEED),
            Loc.parse(out_uri),
            device=dev,
        )
    finally:
        torch.set_num_threads(before)  # a trial that ran it in its own process goes on as it was
    return {**info, "process": here}


def _end_to_end(spec: Spec, data: GroupData, inputs: dict[str, Stage], out: Loc) -> dict:
    """Fine-tune the ERM network with the clusters stage's groups, as a Ray task; a resumed run or a bench
    row never fine-tunes twice. A task even on a one-node Ray: a fine-tune is long beside a worker's
    start, and a GPU task's worker exits after it (Ray's max_calls=1 for GPU tasks), so the driver never
    holds a CUDA context and its cached memory through the rest of the run or sweep."""
    import ray

    threads = 1 if spec.resources.gpu is True or not ray.is_initialized() else cpus_per_worker(1, spec)
    return run_task(
        spec,
        end_to_end_task,
        spec.to_dict(),
        str(inputs["erm"].dir / "model.pt"),
        str(inputs["clusters"].dir / "pseudo_groups.npy"),
        str(out),
        threads,
        cpus=spec.resources.task_cpus if spec.resources.gpu is True else threads,
        inline_on_one_node=False,
    )


STAGES: tuple[StageDef, ...] = (
    StageDef(
        "erm",
        (),
        ("seed", "dataset", "model", "erm"),
        _erm,
        "Ray Train: erm.num_workers workers, 1 GPU or resources.worker_cpus CPUs each",
    ),
    # layout 2: test only (val's features and logits moved to the heatmaps stage)
    StageDef(
        "features",
        ("erm",),
        (),
        _features,
        "a Ray task: resources.task_cpus, resources.task_gpus of a GPU when resources.gpu",
        extra=features_precision_key,
        extra_keys=("heatmaps.precision",),
    ),
    # layout 2: each shard also holds the val features and logits of its forward
    StageDef(
        "heatmaps",
        ("erm",),
        ("heatmaps",),
        _heatmaps,
        "a Ray actor pool: heatmaps.num_actors actors, 1/heatmaps.actors_per_gpu GPU each or CPU threads",
    ),
    # reads the heatmaps stage alone (val's features and logits are there since layout 2)
    StageDef(
        "clusters",
        ("heatmaps",),
        ("clustering", "groups", "seed"),
        _clusters,
        "a Ray task: resources.task_cpus, resources.task_gpus of a GPU when resources.gpu",
    ),
    # no device in its own key: its inputs' keys carry it
    StageDef(
        "end_to_end",
        ("erm", "clusters"),
        ("retrain", "seed"),
        _end_to_end,
        "a Ray task: resources.task_gpus when resources.gpu (and resources.task_cpus), else resources.worker_cpus CPUs",
        device=False,
        when=lambda spec: spec.retrain.mode == "end_to_end",
    ),
)
BY_NAME = {sd.name: sd for sd in STAGES}


def _needed(spec: Spec, targets: Iterable[str] | None) -> list[StageDef]:
    """The stages `targets` need (all that apply to `spec` when None), in STAGES order."""
    want = {sd.name for sd in STAGES if sd.applies(spec)} if targets is None else set(targets)
    for sd in reversed(STAGES):
        if sd.name in want:
            want.update(sd.inputs)
    return [sd for sd in STAGES if sd.name in want]


def stage_keys(spec: Spec, cache: StageCache, targets: Iterable[str] | None = None) -> dict[str, Stage]:
    """Every stage of `spec` (or `targets` and their inputs) with its key and folder in `cache`.

    The one place stage keys come from: the pipeline, bench, sweeps and benchmarks all ask here.
    `spec.resources.gpu` must be resolved (`resources.resolve_resources`): the device is in the keys."""
    stages: dict[str, Stage] = {}
    for sd in _needed(spec, targets):
        stages[sd.name] = cache.stage(sd.name, stage_config(sd, spec), tuple(stages[i] for i in sd.inputs))
    return stages


def sections_of(name: str) -> set[str]:
    """The spec sections stage `name`'s key depends on, through its inputs too."""
    sd = BY_NAME[name]
    return set(sd.sections).union(*(sections_of(i) for i in sd.inputs))


def _inputs_of(name: str) -> set[str]:
    """Every stage `name` reads, directly or through its inputs."""
    return set(BY_NAME[name].inputs).union(*(_inputs_of(i) for i in BY_NAME[name].inputs))


def changes(name: str, key: str) -> bool:
    """Whether a value of spec key `key` (dotted) enters stage `name`'s key."""
    if key in BY_NAME[name].extra_keys or any(key in BY_NAME[i].extra_keys for i in _inputs_of(name)):
        return True
    section, _, field = key.partition(".")
    if section == "retrain" and not legacy.retrain_key_hashed(field):
        return False
    return section in sections_of(name) and field not in execution_only(section)


def shared_stages(spec: Spec, searched: Iterable[str]) -> list[str]:
    """The stages of `spec` whose keys none of the `searched` spec keys changes: a sweep's shared upstream."""
    searched = list(searched)
    return [sd.name for sd in STAGES if sd.applies(spec) and not any(changes(sd.name, k) for k in searched)]


def run_stages(
    spec: Spec,
    data: GroupData,
    cache: StageCache,
    timer: Timer | None = None,
    targets: Iterable[str] | None = None,
    have: "Upstream | None" = None,
) -> tuple[dict[str, Stage], dict[str, dict]]:
    """Compute (or reuse) `targets` and their inputs (every stage of `spec` when None): (stages, infos by name).

    Stages already in `have` under the same key are taken from it as they are. Every stage reads and
    writes under the cache's storage root; ERM runs on Ray Train, the heatmaps on an actor pool,
    features, clusters and end_to_end as Ray tasks, so none of them depends on the driver's disk."""
    spec = resolve_resources(spec)  # a no-op when run_pipeline or a sweep resolved it already
    timer = timer or Timer()
    stages = stage_keys(spec, cache, targets)
    infos = {}
    for name, stage in stages.items():
        if have is not None and name in have.stages and have.stages[name].key == stage.key:
            infos[name] = have.info[name]
            continue
        sd = BY_NAME[name]
        inputs = {i: stages[i] for i in sd.inputs}
        with timer(name):
            infos[name] = cache.run(stage, lambda d, sd=sd, inputs=inputs: sd.compute(spec, data, inputs, d))
    return stages, infos


@dataclass
class Upstream:
    """What evaluation reads from the stages of one spec: their folders, their infos and the arrays."""

    stages: dict[str, Stage]  # by stage name: key and folder
    info: dict[str, dict]  # by stage name: its `done` record (ERM history, cluster sizes, ...)
    val_features: np.ndarray  # (N_val, d) penultimate features of the ERM model (the heatmaps stage's)
    test_features: np.ndarray  # (the features stage's)
    val_logits: np.ndarray  # (N_val, n_classes)
    test_logits: np.ndarray
    pseudo: np.ndarray  # (N_val,) the clusters stage's groups (groups.source)

    @cached_property
    def heatmaps(self) -> np.ndarray:
        """The val heatmaps, loaded whole on first use (group sources run in this process: bench)."""
        return HeatmapShards(self.stages["heatmaps"].dir).load()


def compute_upstream(
    spec: Spec, data: GroupData, cache: StageCache, timer: Timer | None = None, have: Upstream | None = None
) -> Upstream:
    """Every stage of `spec`, computed or reused (those in `have` taken as they are), with the arrays
    evaluation reads loaded."""
    stages, infos = run_stages(spec, data, cache, timer, have=have)
    feats, val = stages["features"].dir, HeatmapShards(stages["heatmaps"].dir)
    return Upstream(
        stages,
        infos,
        val.features(),
        load_npy(feats / "test_features.npy"),
        val.logits(),
        load_npy(feats / "test_logits.npy"),
        load_npy(stages["clusters"].dir / "pseudo_groups.npy"),
    )
