"""The typed experiment spec: every default in one place, each with its reason.

    exmap-ray spec                       # print every key, its default and why
    exmap-ray spec cmnist --set clustering.k=4   # print a shipped spec, resolved (a file path works too)

Precedence (as in timm's train.py): dataclass default < YAML file < `--set`.
The resolved spec is saved next to every run.  Unknown keys, wrong types and
bad values raise `SpecError` naming the dotted key path and what is allowed,
before any work starts.

Each plugin owns its section, declared beside its code with `options.opt`:
a retrainer's keys are `retrain.<name>` (its registered `keys` dataclass;
`retrain_class` adds one field per retrainer to `RetrainSpec`, which keeps the
keys all share), and a dataset's own keys join `DatasetSpec`'s common ones in
`dataset:` when `dataset.name` names it (`dataset_class`); a key of another
dataset is refused naming who takes it. Keys that moved stop with their new
place (`MOVED`). Building these sections needs the plugins: `registry.require`
imports them by name, so the spec module itself imports none.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from . import registry
from .errors import SpecError, did_you_mean
from .options import default_of, opt  # noqa: F401  (opt re-exported: spec.opt, as before)
from .options import fraction as _fraction, non_negative as _non_negative, positive as _positive
from .hashing import stable_hash, stage_seed  # noqa: F401  (re-exported: spec.stage_seed, spec.stable_hash)
from .legacy import FIELD_ORDER, MOVED, moved_message  # noqa: F401  (MOVED, moved_message re-exported)


def _gpu_share(v, zero: bool = False):
    """A Ray GPU request: a fraction in (0, 1) or a whole number (Ray refuses 1.5); 0 where `zero`."""
    if (zero and v == 0) or (0 < v < 1) or (v >= 1 and float(v).is_integer()):
        return None
    return (
        "0, a fraction below 1 (0.5) or a whole number of GPUs"
        if zero
        else "a fraction below 1 (0.5) or a whole number of GPUs"
    )


PICKABLE = ("clustering.", "groups.")  # what a groups.pick_among entry may set: the clusters stage's keys


def _pick_check(v):
    for i, entry in enumerate(v):
        bad = [k for k in entry if not str(k).startswith(PICKABLE) or k in ("groups.pick_among", "groups.source")]
        if bad:
            return (
                f"a list of mappings of clustering.* and groups.* keys (not groups.source or groups.pick_among), "
                f"e.g. [{{}}, {{clustering.input: both}}]; entry {i} sets {', '.join(map(str, bad))}"
            )
    return None


def _k_check(v):
    return None if v == "auto" or v >= 2 else "an integer >= 2, or 'auto' (eigengap)"


@dataclass
class DatasetSpec:
    """The keys every dataset takes. A dataset's own keys (cmnist's rho, n_train, ...; an on-disk one's
    root) are declared beside its code (`DatasetEntry.keys`) and sit in the same `dataset:` mapping:
    `spec.dataset` is this class extended by the chosen dataset's keys (`dataset_class`)."""

    name: str = opt("cmnist", "registry name; `exmap-ray datasets` lists them and the keys each takes")
    image_size: Optional[int] = opt(
        None,
        "square input size; None = the dataset's own (cmnist 28, folder and the on-disk benchmarks 224)",
        lambda v: None if v is None or v >= 8 else "an integer >= 8",
    )
    mean: Optional[list[float]] = opt(
        None, "per-channel normalisation mean; None = the dataset's own (cmnist none, folder ImageNet)"
    )
    std: Optional[list[float]] = opt(None, "per-channel normalisation std; None = the dataset's own")
    loader_workers: int = opt(
        0, "DataLoader worker processes per Ray worker; 0 suits in-memory data", _non_negative, execution=True
    )
    pin_memory: Union[bool, Literal["auto"]] = opt(
        "auto", "page-locked host batches for faster copies to the GPU; 'auto' = when CUDA is available", execution=True
    )
    persistent_workers: bool = opt(
        True, "keep DataLoader workers alive between epochs (with loader_workers > 0)", execution=True
    )
    decode_cache: Optional[str] = opt(
        "auto",
        "on-disk datasets: val/test images are decoded and eval-transformed "
        "once into a uint8 .npy memmap reused by ERM validation, features, "
        "heatmaps and plots. 'auto' = $EXMAP_RAY_DECODE_CACHE or "
        "~/.cache/exmap_ray/decoded; a path; null = decode on every access",
        execution=True,
    )

    def __reduce__(self):  # rebuilt through the registry: the class of a dataset's keys is made at run time
        return _rebuild, ("dataset", dataclasses.asdict(self))


@dataclass
class ModelSpec:
    backbone: str = opt("resnet10t", "any timm model name; resnet10t is small enough for a 2-core CPU")
    pretrained: Optional[str] = opt(
        None,
        "local weights: a timm/torchvision state dict (.pth/.pt/.bin), a "
        ".safetensors file, a HF hub cache folder (models--timm--NAME) or a folder "
        "holding one weights file; never downloaded. null = train from scratch",
        lambda v: None if v is None or v.strip() else "a path, or null to train from scratch",
    )


@dataclass
class ErmSpec:
    epochs: int = opt(5, "enough for the colour shortcut to dominate on C-MNIST", _positive)
    lr: float = opt(1e-3, "learning rate (of erm.optimizer)", _positive)
    weight_decay: float = opt(1e-4, "weight decay: decoupled for adamw, L2 for sgd", _non_negative)
    optimizer: Literal["adamw", "sgd"] = opt(
        "adamw", "adamw, or sgd with erm.momentum (the DFR/ExMap reference scripts fine-tune ResNet-50 with SGD)"
    )
    momentum: float = opt(0.9, "sgd momentum", _fraction)
    lr_schedule: Literal["constant", "cosine"] = opt(
        "constant", "cosine = per-epoch cosine decay to 0 over erm.epochs (the ExMap reference scripts)"
    )
    batch_size: int = opt(128, "per Ray Train worker", _positive)
    num_workers: int = opt(
        1,
        "Ray Train workers (one per GPU on a cluster); DDP over gloo on CPU. Part of the "
        "ERM cache key: the global batch is batch_size x num_workers",
        _positive,
    )
    keep: Literal["last", "best_val_acc"] = opt(
        "last",
        "the checkpoint ERM hands on: the last epoch's, or the "
        "epoch with the best val accuracy (class labels only; the "
        "ExMap reference's choice)",
    )
    precision: Literal["auto", "bf16", "fp32", "tf32"] = opt(
        "auto",
        "bf16 autocast for the forward and loss; 'auto' = bf16 on CUDA, fp32 on CPU (where bf16 is "
        "slower); fp32 is fp32 on every GPU (TF32 off); tf32 = fp32 with TF32 matmuls and convolutions "
        "on Ampere and later",
    )
    channels_last: bool = opt(False, "NHWC memory layout for model and batches; faster convolutions on recent GPUs")
    compile: bool = opt(False, "torch.compile the model: faster steps after a compile time of a minute or more")
    worker_gpus: float = opt(
        1.0,
        "GPU share of each Ray Train worker (resources.gpu true): 1, or a fraction "
        "such as 0.5 to put two workers on one GPU (they then all-reduce over gloo: "
        "NCCL refuses two ranks on one device)",
        lambda v: _gpu_share(v),
        execution=True,
    )


@dataclass
class HeatmapsCommon:
    """The keys every heatmap method takes. A method's own keys (LRP's rule, integrated gradients' steps)
    are declared beside its code and join these in `heatmaps:` (`section_class`)."""

    method: str = opt("lrp", "registry name: lrp (the paper); `exmap-ray spec` lists every registered method")
    precision: Literal["auto", "bf16", "fp32", "tf32"] = opt(
        "auto",
        "bf16 autocast for the forward passes (LRP keeps its divisions and relevance in fp32); 'auto' = "
        "bf16 on CUDA, fp32 on CPU; fp32 is fp32 on every GPU (TF32 off); tf32 = fp32 with TF32 on "
        "Ampere and later",
    )
    downsize: Optional[int] = opt(
        7,
        "bilinear resize of each heatmap before clustering; the paper's "
        "sizes are Waterbirds 112, CelebA 20; on C-MNIST 7 keeps the colour "
        "channel and removes per-digit stroke detail",
        lambda v: None if v is None or v >= 1 else "an integer >= 1, or null",
    )
    batch_size: int = opt(256, "images per forward/backward in an actor", _positive, execution=True)
    shard_size: int = opt(1024, "images per shard file; one shard is one unit of actor work", _positive, execution=True)
    num_actors: Optional[int] = opt(
        None,
        "extraction actors; None = actors_per_gpu per GPU, else 2 on CPU",
        lambda v: None if v is None or v >= 1 else "an integer >= 1, or null",
        execution=True,
    )
    actors_per_gpu: int = opt(
        1,
        "extraction actors sharing one GPU (each asks for 1/actors_per_gpu of it): a "
        "small model leaves a GPU idle between its batches",
        _positive,
        execution=True,
    )
    store_dtype: Literal["float32", "float16"] = opt(
        "float32",
        "how the heatmap shards are stored; float16 "
        "halves the store and what clustering streams "
        "(each heatmap kept relative to its max |value|); "
        "measured: the same pseudo groups",
        neutral="float32",
    )


@dataclass
class ClusteringCommon:
    """The keys every clusterer takes; a clusterer's own keys (spectral_split's split_*) are declared
    beside its code and join these in `clustering:` (`section_class`)."""

    method: str = opt(
        "spectral",
        "registry name: spectral (the paper); `exmap-ray spec` lists every registered "
        "clusterer (k-means prefers to split the big group on imbalanced data)",
    )
    input: Literal["heatmaps", "features", "both"] = opt(
        "heatmaps",
        "what is clustered: the ERM model's heatmaps "
        "(ExMap), its penultimate val features "
        "(GEORGE-style), or both side by side (each "
        "block scaled by its own max |value|); the "
        "same clusterer either way",
    )
    k: Union[int, Literal["auto"]] = opt(
        "auto",
        "clusters per scope; 'auto' = eigengap over 2..k_max "
        "(spectral, kmeans), best silhouette (kmeans_silhouette), "
        "lowest BIC (gmm)",
        _k_check,
    )
    k_max: int = opt(10, "largest k 'auto' may pick (paper: 10)", lambda v: None if v >= 2 else "an integer >= 2")
    scope: Literal["local", "global"] = opt(
        "local", "local = cluster each class apart (pseudo group = class x cluster); global = all points together"
    )
    niter: int = opt(25, "k-means iterations", _positive)
    nredo: int = opt(3, "k-means restarts; the best inertia wins", _positive)
    normalize: bool = opt(True, "divide each heatmap by its max |value| (paper)")
    cross_spatial: Literal["none", "all", "hard"] = opt(
        "none",
        "also cluster each heatmap summed over its channels (where the relevance lies, whichever channel "
        "carries it), the same way, and split every (class, cluster) by those clusters: all = keep every "
        "part; hard = keep apart only the parts on which ERM's val accuracy is below its accuracy on the "
        "whole (class, cluster), the rest stays one group. For a shortcut the channels hide, e.g. a "
        "patch's place beside a colour; needs (N, C, h, w) heatmaps and clustering.input heatmaps or both",
        neutral="none",
    )
    cross_features: Literal["none", "all", "hard"] = opt(
        "none",
        "also cluster the penultimate val features, the same way, and split every (class, cluster) of the "
        "heatmaps by those clusters (the product of the two groupings: a minority either one separates "
        "gets groups of its own): all = keep every part; hard = keep apart only the parts on which ERM's "
        "val accuracy is below its accuracy on the whole (class, cluster). Needs clustering.input heatmaps; "
        "one crossing at a time (not with cross_spatial)",
        neutral="none",
    )
    min_group_size: int = opt(
        5,
        "pseudo groups smaller than this merge into the nearest group of their class; "
        "DFR subsamples every group to the smallest, so tiny fragments starve it. "
        "1 keeps every group, as the released ExMap does (with "
        "retrain.dfr.whole_group_max: 5)",
        _positive,
    )

    def __post_init__(self):
        if self.cross_features != "none" and (self.input != "heatmaps" or self.cross_spatial != "none"):
            raise SpecError(
                f"spec key 'clustering.cross_features': '{self.cross_features}' splits the heatmaps' "
                f"clusters by the features' clusters, so it needs clustering.input heatmaps (got "
                f"'{self.input}') and clustering.cross_spatial none (got '{self.cross_spatial}'): one "
                f"crossing at a time"
            )
        if self.cross_spatial != "none" and self.input == "features":
            raise SpecError(
                f"spec key 'clustering.cross_spatial': '{self.cross_spatial}' splits clusters by the "
                f"heatmaps' channel sums, and clustering.input 'features' clusters no heatmaps; use "
                f"clustering.input heatmaps or both, or clustering.cross_spatial none"
            )


@dataclass
class GroupsCommon:
    """The keys every group source takes; a source's own keys (random's random_k) are declared beside
    its code and join these in `groups:` (`section_class`)."""

    source: str = opt(
        "exmap",
        "registry name of the val grouping retraining uses: exmap (heatmap clusters, the "
        "paper); `exmap-ray spec` lists every registered source (SpuCo's with pip install "
        "'exmap-ray[peers]')",
    )
    merge_easy: bool = opt(
        False,
        "after a label-free source: within each class, merge the pseudo groups on which "
        "ERM's val accuracy is at least its accuracy on the whole class into one group "
        "(undoes splitting the groups ERM already gets right, e.g. with clustering.method "
        "spectral_split); never the oracle's true groups",
        neutral=False,
    )
    split_ica: bool = opt(
        False,
        "after a label-free source (and groups.merge_easy): look in each pseudo group of 100+ val points for "
        "a second shortcut, as an independent component of ERM's val features with two clearly separate "
        "modes (the smaller 3-25% of the group); every group is split by each one found. For shortcuts "
        "that the clustering leaves inside its groups, e.g. a pair's weaker one (docs/methods.md); never "
        "the oracle's true groups",
        neutral=False,
    )
    pick_among: list[dict] = opt(
        [],
        "a small label-free sweep on the shared upstream: a list of settings of clustering.* and "
        "groups.* keys ({} = this spec as it is); `run` clusters val once per entry, retrains on each "
        "grouping and keeps the one `exmap-ray tune` would choose (search.metric, search.select, "
        "search.se), with every candidate's scores in results.json (with groups.source exmap and retrain.mode "
        "last_layer; an end-to-end fine-tune uses this spec's own groups). Empty: this spec's own groups",
        lambda v: _pick_check(v),
        execution=True,  # no stage's output depends on it: it chooses among the clusters stages of its entries
    )


@dataclass
class EndToEndSpec:
    """`retrain.mode: end_to_end`: the fine-tune of the whole network (retrain/finetune.py), the same loop
    for every retrainer with an end-to-end mode (groupdro, jtt); each reads its own objective's keys from
    its section (retrain.groupdro.eta, retrain.jtt.upweight)."""

    lr: float = opt(
        1e-4, "SGD step size (momentum 0.9) for the whole network", _positive, search={"grid": [1e-4, 1e-3, 1e-2]}
    )
    weight_decay: float = opt(1e-4, "SGD weight decay", _non_negative)
    epochs: int = opt(1, "passes over val", _positive, search={"grid": [1, 4]})
    batch_size: int = opt(128, "minibatch of the fine-tune (GroupDRO and JTT)", _positive)


@dataclass
class RetrainSpec:
    """The keys every retrainer shares. Each retrainer's own keys sit in its section, `retrain.<name>`,
    declared beside its code (`Retrainer.keys`, e.g. retrain/dfr.py's DfrKeys): `spec.retrain` is this
    class with one such section per registered retrainer (`retrain_class`)."""

    method: str = opt(
        "dfr",
        "registry name: dfr (the paper), groupdro (Sagawa et al. online GroupDRO), jtt (Liu "
        "et al. error-set upweighting); each reads its own section retrain.<method>",
    )
    mode: Literal["last_layer", "end_to_end"] = opt(
        "last_layer",
        "last_layer = a linear head on frozen standardised val features (as DFR); end_to_end = "
        "fine-tune the whole ERM model on val images (groupdro, jtt only; retrain.end_to_end)",
    )
    n_select_repeats: int = opt(
        5,
        "random val halves on which every retrainer chooses its hyperparameter (DFR's "
        "C, the groupdro / jtt weight decay); one seed gives every retrainer the same "
        "halves",
        _positive,
    )
    # then, made by retrain_class: one section per registered retrainer (retrain.dfr, ...), and end_to_end

    def __reduce__(self):  # rebuilt through the registry: the class with the retrainers' sections is made at run time
        return _rebuild, ("retrain", dataclasses.asdict(self))

    def __post_init__(self):
        retrainers = registry.for_key("retrain.method")  # a retrainer entry says its modes
        if self.mode == "end_to_end" and retrainers is not None:
            if self.method in retrainers and "end_to_end" not in retrainers.get(self.method).modes:
                able = [n for n in retrainers.names() if "end_to_end" in retrainers.get(n).modes]
                raise SpecError(
                    f"spec key 'retrain.mode': 'end_to_end' is not available for retrain.method "
                    f"'{self.method}' (last layer only); use retrain.mode last_layer, or a method "
                    f"with an end-to-end mode: {', '.join(able)}"
                )


@dataclass
class TrackingSpec:
    experiment: Optional[str] = opt(None, "MLflow experiment; None = the spec's name")
    uri: Optional[str] = opt(None, "MLflow tracking URI; None = sqlite:///OUT/mlflow.db")


@dataclass
class SearchSpec:
    space: dict = opt(
        {},
        "dotted spec key -> one domain: {grid: [...]}, {choice: [...]}, "
        "{uniform: [lo, hi]}, {loguniform: [lo, hi]} or {randint: [lo, hi]}",
    )
    metric: Literal[
        "sweep_worst_pseudo_group_acc",
        "sweep_pooled_worst_group_acc",
        "val_worst_pseudo_group_acc",
        "val_worst_class_acc",
    ] = opt(
        "sweep_worst_pseudo_group_acc",
        "label-free selection metric on held-out val halves. sweep_*: each trial "
        "scored on every trial's pseudo groups (worst): sweep_worst_* takes each half's worst group "
        "and averages over halves; sweep_pooled_* pools each group's held-out predictions over the "
        "halves first, then takes the worst group (steadier where groupings have many small groups); "
        "val_*: on its own pseudo groups / on classes. "
        "The own-groups metrics overrate trials whose clustering missed the minority",
    )
    select: Literal["one_se", "best"] = opt(
        "one_se",
        "how the label-free metric picks the configuration. best = the highest score; one_se = the "
        "trial with the fewest pseudo groups among those within one standard error (search.se) of "
        "the highest: differences smaller than the score's own noise do not decide",
    )
    se: Literal["binomial", "halves"] = opt(
        "binomial",
        "the standard error one_se uses. binomial = sqrt(p(1-p)/n), n the val size of the group "
        "the top score rests on; halves = the spread of the score over the held-out halves, which "
        "overlap and so understate the noise of a group of a few images",
    )
    min_members: int = opt(
        3,
        "the sweep_* metrics leave out groups with fewer val members than this: a group of a few images "
        "has an accuracy of a few held-out predictions, and the worst of many such noisy values decides "
        "the score (and so groups.pick_among's choice or a sweep's) more than any real difference",
        _positive,
    )
    num_samples: int = opt(1, "Tune num_samples: repeats of the grid, or random draws for sampled domains", _positive)
    algorithm: Literal["basic", "optuna", "hyperopt"] = opt(
        "basic", "basic = grid/random; optuna and hyperopt need their package installed"
    )
    max_concurrent_trials: int = opt(
        2, "trials at once; each runs clustering + DFR (+ any upstream it varies)", _positive
    )
    trial_cpus: float = opt(
        0.25,
        "logical CPUs a trial reserves; small, so ERM workers and heatmap actors started inside trials still find CPUs",
        _positive,
    )
    trial_gpus: float = opt(
        0.0,
        "GPU share a trial reserves: its GPU stages (clusters, heatmaps, end-to-end) "
        "then run on that share, in the trial's process; 0 = trials hold no GPU and their "
        "GPU stages ask Ray for their own (resources.task_gpus, heatmaps.actors_per_gpu). "
        "A fraction below 1 or a whole number",
        lambda v: _gpu_share(v, zero=True),
    )
    max_failures: int = opt(1, "retries of a failing trial before it is reported as failed", _non_negative)
    storage_path: Optional[str] = opt(
        None,
        "Tune's own state: a local path or a URI (s3://, gs://, as Ray's "
        "storage_path); None = OUT/tune, under the storage root",
    )


@dataclass
class ResourcesSpec:
    gpu: Union[bool, Literal["auto"]] = opt(
        "auto",
        "GPUs for ERM workers, heatmap actors and the features, clustering and end-to-end tasks: true, "
        "false, or 'auto' = yes when the Ray cluster has GPUs (after asking the autoscaler, see "
        "autoscale_wait_s). Decided once per run, before any stage, and part of every stage's cache key",
    )
    autoscale_wait_s: float = opt(
        0.0,
        "gpu auto on a cluster that shows no GPU yet: ask the autoscaler for "
        "erm.num_workers GPUs (ray.autoscaler.sdk.request_resources) and wait at "
        "most this long for them; 0 = do not ask (a laptop). cluster.yaml's "
        "commands use 600",
        _non_negative,
    )
    task_gpus: float = opt(
        1.0,
        "GPU share the features, clustering and end-to-end tasks each ask for (resources.gpu "
        "true); a fraction lets them share a GPU with heatmap actors or other tasks",
        lambda v: _gpu_share(v),
        execution=True,
    )
    task_cpus: float = opt(
        1.0,
        "CPUs the features and clustering tasks each reserve, and the end-to-end task "
        "beside its GPU (they run as Ray tasks, on whichever node has room, reading and "
        "writing the storage root; features and clustering in the caller's process "
        "instead on a one-node Ray; any of them in a Tune trial that holds at least this "
        "many CPUs, see search.trial_cpus)",
        _positive,
    )
    worker_cpus: Union[int, Literal["auto"]] = opt(
        "auto",
        "CPU threads of each ERM worker and heatmap actor when on CPU, and of the end-to-end fine-tune "
        "task; auto = an equal share of the free CPUs, at most one node's. Fix it (e.g. 1) to get "
        "bit-identical results on clusters of another shape",
        lambda v: None if v == "auto" or v >= 1 else "an integer >= 1, or 'auto'",
    )


@dataclass
class Spec:
    name: str = opt("exmap", "names the MLflow experiment and the run")
    seed: int = opt(0, "root seed; each stage derives its own by hashing (stage_seed)", _non_negative)
    dataset: DatasetSpec = field(default_factory=lambda: dataset_class(DatasetSpec.name)())
    model: ModelSpec = field(default_factory=ModelSpec)
    erm: ErmSpec = field(default_factory=ErmSpec)
    heatmaps: HeatmapsCommon = field(default_factory=lambda: section_class("heatmaps")())
    clustering: ClusteringCommon = field(default_factory=lambda: section_class("clustering")())
    groups: GroupsCommon = field(default_factory=lambda: section_class("groups")())
    retrain: RetrainSpec = field(default_factory=lambda: retrain_class()())
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        return flatten(self.to_dict())


# --------------------------------------------------------------------------- validation


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value, tp, path: str):
    """Return `value` as type `tp`, or raise SpecError naming `path`."""
    origin = typing.get_origin(tp)
    if origin is Union:
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except SpecError:
                pass
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, (list, tuple)):
            (inner,) = typing.get_args(tp)
            return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise SpecError(f"spec key '{path}': got {value!r}, expected {_type_name(tp)}")


def _build(cls, data: dict, path: str):
    if not isinstance(data, dict):
        raise SpecError(f"spec key '{path or '<top>'}': expected a mapping of keys, got {data!r}")
    if cls is DatasetSpec:  # the chosen dataset's keys join the common ones
        return _build_dataset(data, path)
    if cls is RetrainSpec:  # one section per registered retrainer
        cls = retrain_class()
    for section, (common, _) in SECTIONS.items():  # the common keys and those every plugin declares
        if cls is common:
            cls = section_class(section)
    return _build_fields(cls, data, path)


def _build_fields(cls, data: dict, path: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        where = f"{path}.{key}" if path else str(key)
        _raise_if_moved(where, data[key])
        raise SpecError(f"unknown spec key '{where}'.{did_you_mean(key, fields)} Valid keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp, sub = hints[name], f"{path}.{name}" if path else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, sub)
            continue
        value = _coerce(value, tp, sub)
        named = registry.for_key(sub)  # a registry name: the registry's own error, with a near name
        if named is not None and value is not None:
            named.get(value)
        check = fields[name].metadata.get("check")
        problem = check(value) if (check and value is not None) else None
        if problem:
            raise SpecError(f"spec key '{sub}': got {value!r}, expected {problem}")
        kwargs[name] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------- the plugins' sections

_CLASSES: dict = {}  # made once per set of declared keys, so that equal specs compare equal


def _key_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)] if cls is not None else []


def _made(cls: type) -> type:
    cls.__module__ = __name__  # pickled by value never: __reduce__ rebuilds them (`_rebuild`)
    return cls


# the sections whose plugins' keys sit beside the common ones, flat: section -> (common keys, registry key)
SECTIONS = {
    "heatmaps": (HeatmapsCommon, "heatmaps.method"),
    "clustering": (ClusteringCommon, "clustering.method"),
    "groups": (GroupsCommon, "groups.source"),
}
PUBLIC = {"HeatmapSpec": "heatmaps", "ClusteringSpec": "clustering", "GroupsSpec": "groups"}


def _copy_field(f, tp) -> tuple:
    kw = {"metadata": f.metadata}
    if f.default is not dataclasses.MISSING:
        kw["default"] = f.default
    if f.default_factory is not dataclasses.MISSING:
        kw["default_factory"] = f.default_factory
    return f.name, tp, field(**kw)


def section_class(section: str) -> type:
    """The class of `spec.<section>` for a section plugins share ("heatmaps", "clustering", "groups"): its
    common keys and the keys every registered plugin of it declares (`@REGISTRY.register(NAME, keys=...)`),
    flat, in `legacy.FIELD_ORDER` (new keys after). `spec.HeatmapSpec` etc. name these classes."""
    common, registry_key = SECTIONS[section]
    entries = registry.require(registry_key)
    plugin_keys = [(n, entries.keys_of(n)) for n in entries.names() if entries.keys_of(n) is not None]
    marker = (section, tuple(k for _, k in plugin_keys))
    if marker in _CLASSES:
        return _CLASSES[marker]
    fields, owner = {}, {}
    for who, cls in [("", common)] + plugin_keys:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in fields and fields[f.name][2].metadata is not f.metadata:
                raise ValueError(
                    f"spec key '{section}.{f.name}' is declared by {owner[f.name] or 'the common keys'} "
                    f"and by {entries.kind} '{who}'; rename one"
                )
            fields.setdefault(f.name, _copy_field(f, hints[f.name]))
            owner.setdefault(f.name, who)
    order = {k: i for i, k in enumerate(FIELD_ORDER.get(section, ()))}
    ranked = sorted(fields.values(), key=lambda t: order.get(t[0], len(order)))  # stable: new keys keep theirs
    namespace = {
        "__reduce__": lambda self, _s=section: (_rebuild, (_s, dataclasses.asdict(self))),
        "__doc__": common.__doc__,
    }
    if "__post_init__" in common.__dict__:
        namespace["__post_init__"] = common.__dict__["__post_init__"]
    name = {v: k for k, v in PUBLIC.items()}[section]
    _CLASSES[marker] = _made(dataclasses.make_dataclass(name, ranked, namespace=namespace))
    return _CLASSES[marker]


def __getattr__(name: str):  # spec.HeatmapSpec, spec.ClusteringSpec, spec.GroupsSpec: made once the plugins load
    if name in PUBLIC:
        return section_class(PUBLIC[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dataset_class(name: str) -> type:
    """`DatasetSpec` extended by the keys dataset `name` declares (`DatasetEntry.keys`): the class of
    `spec.dataset` when `dataset.name` is `name`."""
    entries = registry.require("dataset.name")
    entries.get(name)
    keys = entries.keys_of(name)
    if keys is None:
        return DatasetSpec
    if ("dataset", keys) not in _CLASSES:
        _CLASSES["dataset", keys] = _made(
            dataclasses.make_dataclass(f"{keys.__name__}DatasetSpec", [], bases=(keys, DatasetSpec))
        )
    return _CLASSES["dataset", keys]


def retrainer_sections() -> dict[str, type]:
    """retrainer name -> the dataclass of its keys (its section `retrain.<name>`), for every registered one."""
    entries = registry.require("retrain.method")
    return {name: entries.keys_of(name) for name in entries.names() if entries.keys_of(name) is not None}


def retrain_class() -> type:
    """`RetrainSpec` with one field per registered retrainer, its section `retrain.<name>`, and the
    end-to-end fine-tune's section `retrain.end_to_end`."""
    own = retrainer_sections()
    sections = {**own, "end_to_end": EndToEndSpec}
    marker = ("retrain", tuple(sections.items()))
    if marker not in _CLASSES:
        taken = {f.name for f in dataclasses.fields(RetrainSpec)} | {"end_to_end"}
        if taken & set(own):
            raise ValueError(
                f"retrainer '{sorted(taken & set(own))[0]}': its section would be named like the "
                f"shared retrain key of that name ({', '.join(sorted(taken))}); rename it"
            )
        _CLASSES[marker] = _made(
            dataclasses.make_dataclass(
                "RetrainSpec",
                [(name, keys, field(default_factory=keys)) for name, keys in sections.items()],
                bases=(RetrainSpec,),
            )
        )
    return _CLASSES[marker]


def _build_dataset(data: dict, path: str):
    """The dataset section: the common keys, and those of the dataset `data['name']` names. A key that
    belongs to another dataset is an error naming the datasets that take it and what this one takes."""
    name = _coerce(data.get("name", DatasetSpec.name), str, f"{path}.name")
    entries = registry.require("dataset.name")
    entries.get(name)  # an unknown name: the registry's error, with a near name
    cls = dataset_class(name)
    own = set(_key_names(cls))
    for key in data:
        if key in own:
            continue
        takers = [n for n in entries.names() if key in _key_names(dataset_class(n))]
        if takers:
            mine = [k for k in _key_names(cls) if k not in _key_names(DatasetSpec)]
            raise SpecError(
                f"spec key '{path}.{key}' is not a key of dataset '{name}': dataset(s) "
                f"{', '.join(takers)} take it. Dataset '{name}' takes "
                f"{', '.join(mine) if mine else 'no keys of its own'}, besides the keys every "
                f"dataset takes: {', '.join(_key_names(DatasetSpec))}"
            )
    return _build_fields(cls, data, path)


def _rebuild(section: str, data: dict):
    """Unpickling (Ray tasks, deep copies): a section made from what plugins declare, built again through
    the registry."""
    cls = {"dataset": DatasetSpec, "retrain": RetrainSpec}.get(section) or SECTIONS[section][0]
    return _build(cls, data, section)


def _raise_if_moved(where: str, value) -> None:
    """An unknown key that is an old one: name its new place (the leaves' own, for a moved section)."""
    leaves = [f"{where}.{k}" for k in flatten(value)] if isinstance(value, dict) else []
    moved = [k for k in leaves if k in MOVED] or ([where] if where in MOVED else [])
    if moved:
        raise SpecError("; ".join(f"spec key {moved_message(k)}" for k in moved))


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(sets: list[str]) -> dict:
    """['a.b=3', 'c=[1, 2]'] -> {'a': {'b': 3}, 'c': [1, 2]}; values are parsed as YAML."""
    out: dict = {}
    for item in sets or []:
        if "=" not in item:
            raise SpecError(f"--set {item!r}: expected key.path=value, e.g. --set clustering.k=4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise SpecError(f"--set {key}: value {raw!r} is not valid YAML ({e.problem})") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """A spec file as a dict. A top-level `base: OTHER.yaml` (relative to this file) is read first and
    this file's keys are merged over it, so a sweep spec can be a dataset spec plus a `search:` section."""
    data = _read_one_yaml(Path(path))
    base = data.pop("base", None)
    if base is None:
        return data
    path = Path(path)
    if not isinstance(base, str) or not base.strip():
        raise SpecError(
            f"spec file '{path}': key 'base' must be the path of another spec file (relative to this one), got {base!r}"
        )
    base_path = Path(base).expanduser()
    base_path = base_path if base_path.is_absolute() else path.parent / base_path
    if base_path.resolve() in _seen + (path.resolve(),):
        raise SpecError(
            f"spec file '{path}': key 'base' names '{base}', which leads back to '{path}' "
            f"(a cycle); a base file must not name its own descendants"
        )
    if not base_path.is_file():
        raise SpecError(
            f"spec file '{path}': key 'base' names '{base}', but '{base_path}' does not exist; "
            f"give a path relative to '{path.parent}'"
        )
    return _deep_merge(read_yaml(base_path, _seen + (path.resolve(),)), data)


def _read_one_yaml(path: Path) -> dict:
    if not path.is_file():
        raise SpecError(f"spec file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"spec file '{path}' is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"spec file '{path}': the top level must be a mapping of keys, got {type(data).__name__}")
    return data


SHIPPED = Path(__file__).parent / "specs"  # ready-made specs, package data; the repo's tune_specs/ points here
DEMO = "cmnist"  # the spec `exmap-ray run` runs when given none


def shipped_specs() -> list[str]:
    """The names of the specs that ship with exmap-ray (`exmap-ray run NAME`)."""
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def find_spec(ref: str | Path) -> Path:
    """The spec file `ref` names: a file, or a shipped spec's name (no folder, no .yaml)."""
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    names = shipped_specs()
    if path.suffix or len(path.parts) != 1:  # a path that is not there
        raise SpecError(
            f"spec file '{path}' does not exist.{did_you_mean(path.stem, names)} Shipped specs, "
            f"named without a folder or .yaml: {', '.join(names)}"
        )
    if str(ref) not in names:
        raise SpecError(
            f"unknown spec '{ref}': neither a file nor a shipped spec.{did_you_mean(ref, names)} "
            f"Shipped specs: {', '.join(names)}"
        )
    return SHIPPED / f"{ref}.yaml"


def load_spec(path: str | Path | None = None, sets: list[str] | None = None, extra: dict | None = None) -> Spec:
    """Defaults < YAML file < `extra` (a dict) < `--set` overrides.

    `path` is a spec file or the name of a shipped spec (`find_spec`); None means the defaults alone."""
    data = read_yaml(find_spec(path)) if path else {}
    data = _deep_merge(data, extra or {})
    data = _deep_merge(data, parse_overrides(sets or []))
    return from_dict(data)


def from_dict(data: dict) -> Spec:
    spec = _build(Spec, data, "")
    pick_variants(spec)  # each groups.pick_among entry is a valid spec too, or a SpecError naming it
    return spec


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _summary_of(entry) -> str:
    """One line saying what a registry entry is: its summary, or its (fit function's) docstring's first line."""
    if getattr(entry, "summary", ""):
        return entry.summary
    import sys

    fit = getattr(entry, "fit", None)  # a retrainer: its module says what it is
    obj = sys.modules[fit.__module__] if fit is not None else getattr(entry, "fn", None) or entry
    return ((getattr(obj, "__doc__", None) or "").strip().splitlines() or [""])[0]


def describe_defaults() -> str:
    """Every key with its default and reason, for `exmap-ray spec`: the spec's own sections, each
    retrainer's section (retrain.<name>) and each dataset's own keys, wherever they are declared."""
    lines = []

    def key_line(prefix: str, f, who: str = "") -> None:
        search = f.metadata.get("search")
        tail = f"  [search default: {json.dumps(search)}]" if search else ""
        lines.append(f"  {prefix}{f.name} = {json.dumps(default_of(f))}    # {who}{f.metadata.get('why', '')}{tail}")

    def walk(cls, prefix):
        cls = retrain_class() if cls is RetrainSpec else cls
        cls = next((section_class(n) for n, (common, _) in SECTIONS.items() if cls is common), cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                lines.append(f"\n{prefix}{f.name}:")
                walk(hints[f.name], prefix + f.name + ".")
                continue
            key_line(prefix, f)
            named = registry.for_key(prefix + f.name)
            if named is not None:  # what the registry holds, each with its first docstring line
                for name in named.names():
                    lines.append(f"      - {name}: {_summary_of(named.get(name))}")
        if cls is DatasetSpec:  # then each dataset's own keys, with the datasets that take them
            lines.append("  # the keys of each dataset; only those of the chosen dataset.name are valid:")
            common, takers = set(_key_names(DatasetSpec)), {}
            entries = registry.require("dataset.name")
            for name in entries.names():
                for f in dataclasses.fields(dataset_class(name)):
                    if f.name not in common:
                        takers.setdefault((f.name, f.metadata.get("why")), (f, []))[1].append(name)
            for f, names in takers.values():
                key_line(prefix, f, f"{', '.join(names)}: ")

    walk(Spec, "")
    return "\n".join(lines)


def pick_variants(spec: Spec) -> list[tuple[str, Spec]]:
    """`groups.pick_among` as specs: (a label, the spec with that entry's keys set and pick_among empty) per
    entry. Raises SpecError naming the entry whose keys or values are not valid."""
    entries = spec.groups.pick_among
    if not entries:  # every spec read comes here (from_dict): nothing to build for the usual empty list
        return []
    base = spec.to_dict()
    base["groups"]["pick_among"] = []
    out = []
    for i, entry in enumerate(entries):
        over: dict = {}
        for key, value in entry.items():
            node = over
            *parents, last = str(key).split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        try:
            variant = from_dict(_deep_merge(base, over))
        except SpecError as e:
            raise SpecError(f"spec key 'groups.pick_among[{i}]' ({entry}): {e}") from None
        label = ",".join(f"{k}={v}" for k, v in entry.items()) or "as specified"
        out.append((label, variant))
    return out
