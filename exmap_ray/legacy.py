"""Old forms of spec keys and stage keys, in one place, so that the hot path carries none of them.

Stage keys (cache folder names) must stay valid across versions: a cache made before a change is reused
after it. Each entry here keeps one old form alive:
- `ALWAYS_HASHED`: the keys stage keys hashed before `options.opt(neutral=...)` existed, frozen. Any key
  not listed must declare a neutral value (or be execution-only), so that adding it changes no existing
  stage key (tests/test_stages.py checks every registered plugin and section against this).
- `FIELD_ORDER`: the order of the keys in the sections plugins share, as dumps showed them before the
  plugins declared their own keys; new keys follow, in registration order.
- the erm key hashes every dataset's old keys (`LEGACY_DATASET_KEYS`), the end_to_end key the flat
  `retrain` form (`retrain_config`), and the heatmaps key its section at the top level with layout 2
  (`key_form`): see each.
- `MOVED`: spec keys that moved, so that an old spec gets an error naming the new place.
- `upgrade_results`: results.json sections that were renamed (`exmap` is `robust`).

Imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

ALWAYS_HASHED: dict[str, tuple[str, ...]] = {
    "model": ("backbone", "pretrained"),
    "erm": (
        "epochs",
        "lr",
        "weight_decay",
        "optimizer",
        "momentum",
        "lr_schedule",
        "batch_size",
        "num_workers",
        "keep",
        "precision",
        "channels_last",
        "compile",
    ),
    "heatmaps": (
        "method",
        "conv_rule",
        "alpha",
        "beta",
        "gamma",
        "epsilon",
        "canonize",
        "precision",
        "ig_steps",
        "downsize",
    ),
    "clustering": ("method", "input", "k", "k_max", "scope", "niter", "nredo", "normalize", "min_group_size"),
    "groups": ("source", "random_k"),
    "dataset.celeba": ("name", "image_size", "mean", "std", "root", "target", "spurious"),
    "retrain.dfr": ("c_grid", "n_final_fits", "whole_group_max", "balance"),
    "retrain.groupdro": ("eta", "epochs", "lr", "batch_size", "weight_decay_grid"),
    "retrain.jtt": ("upweight", "weight_decay_grid"),
    "retrain.end_to_end": ("lr", "weight_decay", "epochs", "batch_size"),
    "retrain": ("method", "mode", "n_select_repeats"),
    "dataset.cmnist": ("name", "image_size", "mean", "std", "rho", "n_train", "n_val", "n_test", "mnist_root"),
    "dataset.cmnist_multi": (
        "name",
        "image_size",
        "mean",
        "std",
        "rho",
        "n_train",
        "n_val",
        "n_test",
        "mnist_root",
        "rho_patch",
    ),
    "dataset.folder": ("name", "image_size", "mean", "std", "root"),
    "dataset.metashift": ("name", "image_size", "mean", "std", "root"),
    "dataset.urbancars": ("name", "image_size", "mean", "std", "root", "group_by"),
    "dataset.waterbirds": ("name", "image_size", "mean", "std", "root"),
}

FIELD_ORDER: dict[str, tuple[str, ...]] = {
    "heatmaps": (
        "method",
        "conv_rule",
        "alpha",
        "beta",
        "gamma",
        "epsilon",
        "canonize",
        "precision",
        "ig_steps",
        "downsize",
        "batch_size",
        "shard_size",
        "num_actors",
        "store_dtype",
    ),
    "clustering": (
        "method",
        "input",
        "k",
        "k_max",
        "scope",
        "niter",
        "nredo",
        "normalize",
        "split_gap",
        "split_depth",
        "split_min_size",
        "cross_spatial",
        "min_group_size",
    ),
    "groups": ("source", "random_k", "merge_easy"),
}

# Before each dataset declared its own keys, one DatasetSpec held every dataset's, and the erm key hashed
# them all. It still does, the keys the chosen dataset does not take at these (their old defaults), so
# every key made before stays valid; a dataset's own value replaces its entry here.
LEGACY_DATASET_KEYS = {
    "rho": 0.99,
    "rho_patch": 0.9,
    "n_train": 5000,
    "n_val": 3000,
    "n_test": 2000,
    "mnist_root": None,
    "root": None,
    "target": None,
    "spurious": None,
    "group_by": "both",
}

# Before each retrainer owned its section, `retrain` was flat and the end_to_end key hashed it so; the
# hashed form keeps those names (old name <- section, key). DFR's section is hashed by no stage (it has
# no end-to-end mode), nor groupdro.batch_size (the last layer's; the fine-tune's is end_to_end.batch_size).
LEGACY_RETRAIN_KEYS = {
    "groupdro_eta": ("groupdro", "eta"),
    "groupdro_epochs": ("groupdro", "epochs"),
    "jtt_upweight": ("jtt", "upweight"),
    "lr": ("groupdro", "lr"),
    "batch_size": ("end_to_end", "batch_size"),
    "e2e_lr": ("end_to_end", "lr"),
    "e2e_weight_decay": ("end_to_end", "weight_decay"),
    "e2e_epochs": ("end_to_end", "epochs"),
}
UNHASHED_RETRAIN = {"dfr", "groupdro.batch_size"}

# stage name -> its files' layout, hashed only above 1: bumped when a stage's files change, so that a
# cache of the old files is never read as the new (features and heatmaps since val's one pass)
LAYOUT = {"features": 2, "heatmaps": 2}
FLAT = {"heatmaps"}  # stages whose key holds their one section's keys at the top level (their first form)


def retrain_config(r) -> dict:
    """The retrain section as the end_to_end key hashes it: the flat form it had before each retrainer
    owned its section, so existing caches stay valid. The weight-decay grid was one key for groupdro and
    jtt: it is the method's own now. A retrainer registered since adds its section, under its name, when
    it is the method."""
    config = {
        "method": r.method,
        "mode": r.mode,
        "n_select_repeats": r.n_select_repeats,
        "weight_decay_grid": (r.jtt if r.method == "jtt" else r.groupdro).weight_decay_grid,
    }
    config.update({old: getattr(getattr(r, section), key) for old, (section, key) in LEGACY_RETRAIN_KEYS.items()})
    if r.method not in ("dfr", "groupdro", "jtt"):
        config[r.method] = dataclasses.asdict(getattr(r, r.method))
    return config


def retrain_key_hashed(field: str) -> bool:
    """Whether `retrain.<field>` (dotted below retrain) enters the end_to_end key."""
    return not (field in UNHASHED_RETRAIN or field.partition(".")[0] in UNHASHED_RETRAIN)


def key_form(stage: str, config: dict) -> dict:
    """Stage `stage`'s key config ({section: keys, "device": ...}) in the form its key has always had."""
    if stage in FLAT:
        (section,) = [k for k in config if k != "device"]
        config = {**config.pop(section), **config}
    if LAYOUT.get(stage, 1) != 1:
        config["layout"] = LAYOUT[stage]
    return config


# old key -> its new place: an error that names the new key (in a spec, a --set and a search space)
MOVED = {
    "erm.use_gpu": "resources.gpu",
    "dfr": "retrain.dfr",
    "dfr.c_grid": "retrain.dfr.c_grid",
    "dfr.n_final_fits": "retrain.dfr.n_final_fits",
    "dfr.n_select_repeats": "retrain.n_select_repeats",
    "retrain.groupdro_eta": "retrain.groupdro.eta",
    "retrain.groupdro_epochs": "retrain.groupdro.epochs",
    "retrain.lr": "retrain.groupdro.lr",
    "retrain.jtt_upweight": "retrain.jtt.upweight",
    "retrain.weight_decay_grid": "retrain.groupdro.weight_decay_grid' and 'retrain.jtt.weight_decay_grid",
    "retrain.batch_size": "retrain.groupdro.batch_size' (last layer) and 'retrain.end_to_end.batch_size",
    "retrain.e2e_lr": "retrain.end_to_end.lr",
    "retrain.e2e_weight_decay": "retrain.end_to_end.weight_decay",
    "retrain.e2e_epochs": "retrain.end_to_end.epochs",
}


def moved_message(key: str) -> Optional[str]:
    """ "'dfr.c_grid' has moved: use 'retrain.dfr.c_grid' instead" for a key that moved, else None."""
    if key in MOVED:
        return f"'{key}' has moved: use '{MOVED[key]}' instead"
    return None


# results.json (and a sweep's trial records) named the retrain on the pseudo groups "exmap" until
# 2026-12-07, whatever `groups.source` made them; it is "robust" now. Readers of saved results call this.
RESULTS_RENAMED = {"exmap": "robust"}


def upgrade_results(res: dict) -> dict:
    """`res` with its sections under today's names (a copy when any is renamed)."""
    if not any(old in res and new not in res for old, new in RESULTS_RENAMED.items()):
        return res
    return {RESULTS_RENAMED.get(k, k) if RESULTS_RENAMED.get(k) not in res else k: v for k, v in res.items()}
