"""The `exmap-ray` command.

    exmap-ray run                                           # the demo (the shipped spec cmnist) on a local Ray
    exmap-ray run cmnist --set seed=1 --set clustering.scope=local --out runs/s1
    exmap-ray run waterbirds --set dataset.root=/data/waterbird_complete95_forest2water2
    exmap-ray run my_spec.yaml --address ray://head:10001 --tracking-uri http://head:5000
    exmap-ray tune cmnist_sweep [--resume]                  # a Ray Tune sweep, tracked in MLflow
    exmap-ray sync-mlflow runs/demo [--tracking-uri URI]      # upload a run whose MLflow server went away
    exmap-ray bench cmnist --seeds 3                        # ExMap against the baselines, over seeds
    exmap-ray spec [SPEC] [--set k=v ...]                    # the built-in defaults with reasons, or a resolved spec
    exmap-ray datasets                                       # registered datasets
    exmap-ray datasets check waterbirds --root /data/waterbird_complete95_forest2water2   # verify a dataset on disk

SPEC is a YAML file or the name of a spec that ships with exmap-ray (exmap_ray/specs/; the
repository's tune_specs/ points there); `run`, `tune` and `bench` without one use the demo, cmnist.

An http(s) tracking server that does not answer stops `run` and `tune` within seconds, before
Ray starts (exit 2). One that goes away during `run`, `tune` or `bench` does not stop it: the results are written
to OUT as usual, OUT/mlflow_pending.json says what was not logged, and `sync-mlflow OUT` logs it
once the server is back.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from .errors import UserError
from .storage import redact

log = logging.getLogger("exmap_ray")


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", nargs="?", help="a YAML spec file, or a shipped spec's name (e.g. cmnist, waterbirds)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec key (YAML value), e.g. --set clustering.k=4; repeatable",
    )


def _add_job_args(
    p: argparse.ArgumentParser, out_help: str, quiet_help: str = "only warnings and the final table"
) -> None:
    """The options every Ray job command (run, tune, bench) shares."""
    p.add_argument("--out", help=out_help + "; a local path or a storage URI (s3://BUCKET/PREFIX?..., gs://...)")
    p.add_argument("--cache", help="stage cache to share between runs, a path or a URI (default OUT/cache)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///OUT/mlflow.db)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("--quiet", action="store_true", help=quiet_help)
    loud.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also Ray's own lines: its workers' output, Ray Train's and Tune's reports",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exmap-ray",
        description="ExMap (CVPR 2024) on Ray: ERM -> explainability heatmaps -> clustering into pseudo "
        "groups -> DFR retraining, tracked in MLflow. Group labels are used for evaluation only.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with: exmap-ray run   (the demo, the shipped spec cmnist; see `exmap-ray COMMAND --help`)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run the whole pipeline once and print the results table",
        description="Run ERM, heatmaps, clustering and DFR once; write OUT/results.json, "
        "plots and an MLflow run. Stages are cached in OUT/cache, so a re-run "
        "resumes where the last one stopped.",
    )
    _add_spec_args(run)
    _add_job_args(run, "output folder (default runs/<spec name>)")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in OUT with the same spec: "
        "finished stages are reused, a half-written one is redone",
    )

    tn = sub.add_parser(
        "tune",
        help="run a Ray Tune sweep over the spec's search: section",
        description="Sweep the spec's `search.space` with Ray Tune. ERM and heatmaps shared by all "
        "trials are computed once; each trial is an MLflow child run of one parent run; "
        "OUT/summary.{md,csv,json} names the label-free choice and the oracle's.",
    )
    _add_spec_args(tn)
    _add_job_args(tn, "sweep folder (default runs/<spec name>-sweep)", "only warnings and the final summary")
    tn.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep in OUT: finished trials are not rerun, cached stages not recomputed",
    )

    sy = sub.add_parser(
        "sync-mlflow",
        help="upload a finished run to MLflow after its server was unreachable",
        description="Log a finished `exmap-ray run` output folder to MLflow: the flattened spec as "
        "params, per-epoch ERM metrics, test metrics, stage timings and the artifacts "
        "(results.json, spec.resolved.json and the plots). Completes the run the "
        "pipeline started if the server has it, else makes a new run in the same "
        "experiment tagged exmap_ray.synced_from. Needs DIR/results.json; does "
        "nothing (exit 0) unless DIR/mlflow_pending.json says logging failed. For a "
        "sweep's folder (`exmap-ray tune --out`): the parent run with the summary, then "
        "every trial whose logging failed, nested under the parent. For a bench's "
        "folder (`exmap-ray bench "
        "--out`, it holds bench.json): its run, with the spec and seeds as params, "
        "every row's mean and std and the bench files.",
    )
    sy.add_argument("dir", metavar="DIR", help="the run's, sweep's or bench's output folder or storage URI (its --out)")
    sy.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: the one the run used, from DIR/tracking.json)"
    )
    sy.add_argument("--quiet", action="store_true", help="only warnings and the final line")

    bn = sub.add_parser(
        "bench",
        help="compare ExMap with the baselines over seeds (a Markdown/CSV table)",
        description="For each seed: train ERM and extract heatmaps once, then fit every row "
        "(ERM, oracle DFR, random groups + DFR, feature clustering + DFR, JTT, ExMap "
        "local/global + DFR, ExMap + GroupDRO, ExMap + JTT) and score it on test. "
        "Writes OUT/bench.{md,csv,json} and bench_wga.png, and one MLflow run.",
    )
    _add_spec_args(bn)
    bn.add_argument(
        "--seeds",
        default=None,
        help="number of seeds, from the spec's seed upwards (default 3); with --zoo: a seed set named in "
        "exmap_ray/zoo_protocol.yaml (its NAME_seeds keys: dev, judge, judge2, ...) or integers such as 0,1 "
        "(default: dev)",
    )
    bn.add_argument(
        "--zoo",
        action="store_true",
        help="the shortcut zoo: every family x seed, every row, one table per family and a summary "
        "(OUT/zoo.md, zoo.json, zoo_wga.png); SPEC is not given",
    )
    bn.add_argument(
        "--quick", action="store_true", help="with --zoo: the protocol's quick subset (<= 15 min on 2 cores)"
    )
    bn.add_argument("--families", default=None, help="with --zoo: comma-separated families (default: the protocol's)")
    bn.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE[,KEY=VALUE]",
        help="with --zoo: one more ExMap row, each family's spec with these keys set (repeatable), "
        "e.g. --variant 'both:clustering.input=both'",
    )
    bn.add_argument("--no-sweep", action="store_true", help="with --zoo: leave out the sweep-pick row (faster)")
    bn.add_argument(
        "--no-peers",
        action="store_true",
        help="with --zoo: leave out the SpuCo (GEORGE, SPARE, EIIL) and DPE rows even where installed",
    )
    bn.add_argument(
        "--no-baselines",
        action="store_true",
        help="with --zoo: ERM, the oracle and the ExMap rows only (for comparing --variant rows fast)",
    )
    bn.add_argument(
        "--end-to-end",
        action="store_true",
        help="add rows ExMap + GroupDRO / JTT (end to end): fine-tune the whole ERM network on val "
        "with the ExMap groups (retrain.end_to_end keys); slower than the last-layer rows",
    )
    _add_job_args(bn, "output folder (default runs/<spec name>-bench)")

    sp = sub.add_parser(
        "spec",
        help="print the built-in defaults with their reasons, or a resolved spec",
        description="Without SPEC: the built-in defaults, every key with its default and why "
        "(with --set: the defaults after the overrides, as YAML). With SPEC: the "
        "resolved spec after the YAML file and --set overrides, as YAML. (`run` "
        "without SPEC runs the demo; `exmap-ray spec cmnist` shows its spec.)",
    )
    _add_spec_args(sp)

    ds = sub.add_parser(
        "datasets",
        help="list the registered datasets, or check one on disk",
        description="Without arguments: list the dataset names usable as dataset.name, each with its "
        "own "
        "keys (valid only when dataset.name names it; `exmap-ray spec` gives reasons). "
        "`datasets check NAME --root PATH` verifies an on-disk dataset before a run: "
        "the folder layout, the index files, the count of images per split and "
        "true group, and every missing or unreadable file; it ends with the fix. "
        "Exit 0 when the dataset is usable, 2 when not. `run` makes the same "
        "check before any training.",
    )
    ds_sub = ds.add_subparsers(dest="ds_command", metavar="check")
    chk = ds_sub.add_parser(
        "check",
        help="verify a dataset's layout and files",
        description="Verify NAME at --root: layout, counts per split and group, missing and "
        "unreadable files; ends with the precise fix.",
    )
    chk.add_argument("name", metavar="NAME", help="a registered dataset, e.g. waterbirds, celeba, metashift, urbancars")
    chk.add_argument("--root", help="the dataset folder (dataset.root)")
    chk.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="other dataset keys, e.g. --set dataset.target=Smiling",
    )
    chk.add_argument("--no-verify", action="store_true", help="skip opening every image (layout and counts only)")
    return parser


def _console_level(args) -> int:
    from . import console

    return (
        console.QUIET
        if getattr(args, "quiet", False)
        else (console.VERBOSE if getattr(args, "verbose", False) else console.NORMAL)
    )


def local_ray_defaults() -> None:
    """Ray Train settings for a Ray this process starts on one machine (a user's own values win).

    Train's controller polls its workers every 2 s by default, which adds seconds to every short
    fit; and no laptop is preempted, so the spot-node preemption watcher is left out. Clusters
    (`--address`, RAY_ADDRESS) keep Ray's defaults.
    """
    for k, v in LOCAL_RAY_ENV.items():
        os.environ.setdefault(k, v)


LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@contextlib.contextmanager
def ray_session(address: str | None):
    """Connect to `address` (or $RAY_ADDRESS, or a new local Ray); reuse one the caller started.

    The workers' output (their logs, Ray Train's per-report lines, Ray's own threads' tracebacks) reaches
    this console only under `-v` (log_to_driver): the driver prints the progress itself (console.py),
    errors come back as exceptions, and Ray's log files under /tmp/ray/session_*/logs keep the rest.
    `--quiet` also reaches the workers as QUIET_ENV in the job's runtime env: they then log warnings only."""
    import ray

    from . import QUIET_ENV, console

    from .resources import check_address

    own = not ray.is_initialized()
    if own:
        check_address(address or os.environ.get("RAY_ADDRESS"))  # a dead address: an error in seconds, not a hang
        if not (address or os.environ.get("RAY_ADDRESS")):
            local_ray_defaults()
        loud = console.verbose()
        ray.init(
            address=address,
            logging_level=logging.INFO if loud else logging.WARNING,
            log_to_driver=loud,
            runtime_env={"env_vars": {QUIET_ENV: "1"}} if console.level() == console.QUIET else None,
        )
    try:
        yield
    finally:
        from .resources import release_autoscaler_request

        release_autoscaler_request()  # done or failed: no GPU node is kept up for a job that ended
        if own:
            ray.shutdown()


def job_spec(args):
    """The spec of `run`, `tune` or `bench`: SPEC (a file or a shipped spec's name), else the demo; then --set."""
    from . import plugins  # noqa: F401  (every registry, so the spec's names are checked against them)
    from .spec import DEMO, load_spec

    return load_spec(args.spec or DEMO, args.sets)


def cmd_bench(args) -> int:
    if args.zoo:
        return cmd_bench_zoo(args)
    if args.quick or args.families or args.variant or args.no_sweep or args.no_baselines or args.no_peers:
        raise UserError("--quick, --families, --variant, --no-sweep, --no-peers and --no-baselines go with --zoo")
    spec = job_spec(args)
    try:
        args.seeds = 3 if args.seeds is None else int(args.seeds)
    except ValueError:
        raise UserError(
            f"--seeds {args.seeds!r}: give a number of seeds, e.g. --seeds 3 ('dev' and 'judge' go with --zoo)"
        ) from None
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: give at least 1")
    if args.end_to_end and spec.groups.source != "exmap":
        raise UserError(
            f"--end-to-end fine-tunes on the ExMap groups, but spec key 'groups.source' is "
            f"'{spec.groups.source}'; use groups.source exmap"
        )
    out, cache = _storage(args, f"{spec.name}-bench")
    _check_tracking(args.tracking_uri or spec.tracking.uri, out)
    from .bench import run_bench
    from .pipeline import preflight

    preflight(spec)  # data / backbone / method errors before Ray starts
    seeds = [spec.seed + i for i in range(args.seeds)]
    from .console import tagged

    with ray_session(args.address), tagged("bench"):  # lines outside a stage or row: the bench's own
        summary = run_bench(spec, seeds, out, cache, args.tracking_uri, end_to_end=args.end_to_end)
    print("\n" + summary["table"])
    print(f"\ntable: {redact(str(out / 'bench.md'))} (also .csv, .json; plot {redact(str(out / 'bench_wga.png'))})")
    if summary["mlflow_pending"]:  # the tracker warned when it lost the server; every result is on disk
        print(
            f"MLflow: NOT fully logged (the server became unreachable; {redact(str(out / 'mlflow_pending.json'))} "
            f"says what failed). Every result is in {redact(str(out))}; when the server is back: "
            f"exmap-ray sync-mlflow {out}"
        )
    return 0


def cmd_bench_zoo(args) -> int:
    from . import plugins  # noqa: F401  (every registry: SpuCo's sources are the peer rows, where installed)
    from .bench_zoo import choose_families, choose_seeds, parse_variant, protocol, run_zoo
    from .console import tagged

    if args.spec:
        raise UserError(
            f"bench --zoo takes no SPEC (got '{args.spec}'): it runs the protocol's families; "
            f"choose some with --families"
        )
    proto = protocol()
    families, seeds = choose_families(args.families, proto, args.quick), choose_seeds(args.seeds, proto, args.quick)
    sets = list(proto["quick"].get("sets", [])) if args.quick else []
    sets += list(args.sets or [])
    args.out = args.out or ("runs/zoo-quick" if args.quick else "runs/zoo")
    out, cache = _storage(args, "zoo")
    _check_tracking(args.tracking_uri, out)
    with ray_session(args.address), tagged("zoo"):
        summary = run_zoo(
            families,
            seeds,
            out,
            cache,
            args.tracking_uri,
            sets,
            [parse_variant(v) for v in args.variant],
            sweep=not args.no_sweep,
            baselines=not args.no_baselines,
            peers=not args.no_peers,
        )
    print("\n" + summary["report"].split("## Test WGA by family")[0].rstrip())
    print(
        f"\nreport: {redact(str(out / 'zoo.md'))} (also zoo.json; plot {redact(str(out / 'zoo_wga.png'))}); "
        f"{summary['seconds'] / 60:.1f} min"
    )
    return 0


def cmd_tune(args) -> int:
    spec = job_spec(args)
    from .search import parse_space

    parse_space(spec)  # search-space errors before Ray starts
    out, cache = _storage(args, f"{spec.name}-sweep")
    if spec.search.storage_path:
        from .storage import check_root

        check_root(spec.search.storage_path, "spec key 'search.storage_path'")
    _check_tracking(args.tracking_uri or spec.tracking.uri, out)  # before torch and Ray load
    from .tune import format_summary, run_sweep
    from .console import tagged

    with ray_session(args.address), tagged("sweep"):  # lines outside a stage or trial: the sweep's own
        summary = run_sweep(spec, out, cache, args.tracking_uri, resume=args.resume)
    print("\n" + format_summary(summary))
    print(f"\nsummary: {redact(str(out / 'summary.md'))} (also .csv, .json; plots {redact(str(out / '*.png'))})")
    if summary.get("mlflow_pending"):  # each tracker warned when it lost the server; this is the how-to
        print(
            f"MLflow: NOT fully logged ({len(summary['mlflow_pending'])} folder(s) hold mlflow_pending.json: the "
            f"server became unreachable). Every result is on disk; when the server is back: "
            f"exmap-ray sync-mlflow {out}"
        )
    return 0


def cmd_run(args) -> int:
    spec = job_spec(args)  # spec errors surface here, before any work
    out, cache = _storage(args, spec.name)
    uri = args.tracking_uri or spec.tracking.uri
    _check_tracking(uri, out)  # an unreachable tracking server, in seconds (before torch loads)
    from .pipeline import format_table, preflight, run_pipeline

    if args.resume:
        _check_resume(spec, out)
    data = preflight(spec)  # and data / backbone / method errors here
    if args.resume:
        _mark_interrupted_run(out, uri)
    with ray_session(args.address):
        results = run_pipeline(spec, out, cache, args.tracking_uri, data)
    print("\n" + format_table(results))
    print(f"\nresults: {redact(str(out / 'results.json'))}   plots: {redact(str(out / '*.png'))}")
    from .storage import read_json
    from .tracking import PENDING

    if (out / PENDING).is_file():  # the tracker logged the failure when it happened; this is the how-to
        print(
            f"MLflow run {results['mlflow_run_id']}: NOT fully logged, MLflow at {read_json(out / PENDING)['uri']} "
            f"became unreachable ({out / PENDING}). When it is back: exmap-ray sync-mlflow {out}"
        )
        return 0
    print(
        f"MLflow run {results['mlflow_run_id']}: "
        + (f"see {uri}" if uri else f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow.db'}")
    )
    return 0


def _storage(args, default_name: str):
    """--out and --cache as storage Locs, each proven writable in seconds (before Ray or torch start);
    a Ray address that does not answer is named here too, before the data and the model are built."""
    from .resources import check_address
    from .storage import check_root

    check_address(getattr(args, "address", None) or os.environ.get("RAY_ADDRESS"))
    out = check_root(args.out or Path("runs") / default_name, "--out")
    cache = check_root(args.cache, "--cache") if args.cache else None
    return out, cache


def _check_resume(spec, out) -> None:
    """`run --resume` continues the run in OUT only with the spec that run had."""
    from .spec import MOVED, flatten
    from .storage import read_json

    saved = out / "spec.resolved.json"
    if not saved.is_file():
        raise UserError(f"--resume: no run to resume in '{out}' (no {saved.name}); drop --resume to start one")
    old, new = flatten(read_json(saved)), flatten(spec.to_dict())
    moved = sorted(k for k in old if k in MOVED)  # the saved spec is flat JSON: its leaves
    if moved:
        raise UserError(
            f"--resume: the run in '{out}' was started before spec keys moved ({', '.join(moved[:4])}"
            f"{', ...' if len(moved) > 4 else ''}; `exmap-ray spec` shows where they are now), "
            f"so its saved "
            f"spec cannot be compared; drop --resume and run again with the same --cache: every "
            f"finished stage is reused (stage keys did not change)"
        )
    if new.get("resources.gpu") == "auto":  # the saved spec holds what auto resolved to; it resolves again
        new["resources.gpu"] = old.get("resources.gpu")
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differ:
        raise UserError(
            f"--resume: '{out}' holds a run of another spec (it differs in {', '.join(differ[:8])}); "
            f"resume with the same spec and --set values, or drop --resume / pick another --out"
        )
    log.info("resuming the run in %s: finished stages are reused, an unfinished one is redone", out)


def _mark_interrupted_run(out, uri: str | None) -> None:
    """The interrupted run's MLflow run was left RUNNING: mark it KILLED (best effort)."""
    from . import tracking
    from .storage import read_json

    info = read_json(out / tracking.INFO) if (out / tracking.INFO).is_file() else {}
    run_id = info.get("run_id")
    if not run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(info.get("uri") or uri or tracking.default_uri(out))
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
            log.info("marked the interrupted MLflow run %s as KILLED", run_id)
    except Exception as e:  # noqa: BLE001 - bookkeeping only; the resumed run logs a new run either way
        log.warning("could not mark the interrupted MLflow run %s as KILLED: %s", run_id, e)


def _check_tracking(uri: str | None, out) -> None:
    """Short MLflow HTTP retries/timeouts (unless set by the user), and a dead server caught before Ray starts.
    A storage-URI OUT without a tracking server is refused here too (a SQLite file cannot serve a cluster)."""
    from . import tracking

    tracking.http_defaults()
    tracking.probe(uri, out)
    if not uri:
        tracking.default_uri(out)


def cmd_sync(args) -> int:
    from .storage import Loc
    from .sync_mlflow import sync

    done = sync(args.dir, args.tracking_uri)
    if done["status"] == "nothing pending":
        print(
            f"nothing to sync: {args.dir} has no mlflow_pending.json; its MLflow logging "
            f"did not fail (or was synced already)"
        )
        return 0
    how = "completed the original run" if done["resumed"] else "created a new run (the original is not there)"
    what = {"sweep": "sweep parent run", "bench": "bench run"}.get(done.get("kind"), "run")
    print(
        f"synced {args.dir} to MLflow at {done['uri']}: {how} ({what}) {done['run_id']}, {done['params']} params, "
        f"{done['metrics']} metric values, artifacts {', '.join(done['artifacts']) or 'none'}"
    )
    for t in done.get("trials", []):
        how = "completed" if t["resumed"] else "created"
        print(f"  trial {Loc.parse(t['out']).name}: {how} run {t['run_id']}, {t['metrics']} metric values")
    return 0


def cmd_spec(args) -> int:
    import yaml

    from . import plugins  # noqa: F401  (every registry, so the spec's names are checked against them)
    from .spec import describe_defaults, load_spec

    if not args.spec and not args.sets:  # the built-in defaults (`run` without SPEC runs the demo instead)
        print(describe_defaults())
    else:
        print(yaml.safe_dump(load_spec(args.spec, args.sets).to_dict(), sort_keys=False))
    return 0


def cmd_datasets(args) -> int:
    from .data import DATASETS

    if getattr(args, "ds_command", None) == "check":
        from .data import check_dataset
        from . import plugins  # noqa: F401  (every registry, so the spec's names are checked against them)
        from .spec import load_spec

        extra = {"dataset": {"name": args.name, **({"root": args.root} if args.root else {})}}
        dspec = load_spec(None, args.sets, extra=extra).dataset  # an unknown name: the registry's error
        report = check_dataset(dspec, verify=not args.no_verify, progress=lambda m: print(m, file=sys.stderr))
        print(report.format())
        return 0 if report.ok else 2

    import dataclasses

    width = max(10, *(len(n) for n in DATASETS.names()))
    for name in DATASETS.names():
        keys = DATASETS.get(name).keys
        own = ", ".join(f"dataset.{f.name}" for f in dataclasses.fields(keys)) if keys else "none of its own"
        print(f"{name:<{width}} {DATASETS.get(name).summary} [keys: {own}]")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import console

    args = build_parser().parse_args(argv)
    console.configure(_console_level(args))
    try:
        return {
            "run": cmd_run,
            "tune": cmd_tune,
            "sync-mlflow": cmd_sync,
            "spec": cmd_spec,
            "datasets": cmd_datasets,
            "bench": cmd_bench,
        }[args.command](args)
    except UserError as e:
        print(f"exmap-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
