"""What a person reads: the console of a real `exmap-ray run` (a subprocess with its own local Ray),
by default and under --quiet, and where Ray's token-auth notice goes."""

import logging
import os
import re
import subprocess
import sys

import yaml

from exmap_ray import console

from .conftest import tiny_spec_dict

# Ray's own lines: Ray Train's per-report INFO, a worker's "(RayTrainWorker pid=...)" prefix (or any
# actor's or task's), colour codes, Tune's tables
RAY_NOISE = (
    "TrainingReport",
    "Reporting training result",
    "(RayTrainWorker",
    "(TrainController",
    "pid=",
    "\x1b[",
    "Trial status",
    "Checkpoint successfully created",
)


def _start(tmp_path, cache, *args) -> subprocess.Popen:
    """`exmap-ray run` of the tiny spec in a subprocess, which starts its own local Ray (stderr not a TTY)."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict()))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "exmap_ray", "run", str(spec), "--cache", str(cache), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out, err


def test_console_of_a_run_by_default_and_quiet(tiny_run, tmp_path):
    # --quiet on the session's tiny run cache (every stage reused), beside a run that computes every stage
    quiet = _start(tmp_path, tiny_run[0] / "cache", "--out", str(tmp_path / "quiet"), "--quiet")
    try:
        out, err = _finish(_start(tmp_path, tmp_path / "cache", "--out", str(tmp_path / "run")))
    finally:
        q_out, q_err = _finish(quiet)
    both = out + err
    assert not [n for n in RAY_NOISE if n in both], both
    # each stage's own lines, named by their stage or row; progress of the long stages from the driver
    lines = err.splitlines()
    for pattern in (
        r"\[erm\] epoch 1/1: loss \d\.\d{4}, train acc \d\.\d{3}, val acc \d\.\d{3}, \d+ img/s$",
        r"\[heatmaps\] shard 1/3: 100/300 images, \d+ img/s$",
        r"\[heatmaps\] shard 3/3: 300/300 images, \d+ img/s$",
        r"\[clusters\] clustering: spectral/global -> \d+ pseudo groups",
        r"\[retrain: ExMap\] DFR: C=",
        r"\[retrain: oracle\] DFR: C=",
    ):
        assert [ln for ln in lines if re.search(pattern, ln)], (pattern, err)
    # every line of ours says where it belongs: "HH:MM:SS [stage or row] ..."
    untagged = [ln for ln in lines if not re.match(r"\d\d:\d\d:\d\d (WARNING )?\[[a-z][^]]*\] ", ln)]
    assert not untagged, untagged
    assert "test WGA" in out and "oracle DFR (true val groups)" in out

    # --quiet: the result table and where it is on stdout, nothing on stderr but warnings
    assert all(" WARNING " in ln or "Warning" in ln for ln in q_err.splitlines() if ln.strip()), q_err
    table = (
        "method",
        "---",
        "ERM ",
        "ExMap + DFR ",
        "oracle DFR (true val groups) ",
        "groups.pick_among (",
        "  scores: ",
        "pseudo groups: ",
        "agreement with true val groups: ",
        "true group ",
        "y<5 ",
        "y>=5 ",
        "mean acc = ",
        "results: ",
        "MLflow run ",
    )
    assert all(ln.startswith(table) for ln in q_out.splitlines() if ln.strip()), q_out
    assert len(q_out.splitlines()) == len(out.splitlines()) and q_out.lstrip().startswith("method")
    assert not [n for n in RAY_NOISE if n in q_out + q_err]


def test_ray_token_auth_notice_only_under_verbose():
    """The notice comes from Ray's own function (ray.init on a new local Ray calls it); Ray's warning that
    auth is disabled stays a warning at every level. Seen by a handler on Ray's logger itself (Ray's own
    handler writes to the stderr of when Ray was imported, which no capture fixture can follow)."""
    from ray._private.authentication import authentication_token_setup as auth

    seen: list[str] = []
    catch = logging.Handler()
    catch.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger(auth.__name__)
    logger.addHandler(catch)
    try:
        for level, shown in ((console.NORMAL, False), (console.QUIET, False), (console.VERBOSE, True)):
            console.configure(level)
            seen.clear()
            auth._warn_token_auth_enabled()
            auth._warn_token_auth_disabled()
            assert [m.startswith(console.RAY_AUTH_NOTICE) for m in seen] == [True, False][not shown :], (level, seen)
            assert seen[-1].startswith("Token authentication is disabled")
    finally:
        logger.removeHandler(catch)
        console.configure(console.NORMAL)


def test_progress_lines_and_tags(caplog):
    """Without a terminal a step is one INFO line, tagged; under a tag every line of ours names it."""
    fmt = console.Formatter()
    caplog.set_level(logging.INFO)
    with console.Progress("heatmaps", 2, "shard") as bar:
        assert bar.bar is None and bar.shown
        bar.step(1, "shard 1/2: 50/100 images, 10 img/s", "50/100 images")
    with console.tagged("retrain: oracle"):
        logging.getLogger("exmap_ray.retrain.dfr").info("DFR: C=1")
        logging.getLogger("mlflow.store").warning("slow")
    got = [fmt.format(r)[9:] for r in caplog.records]
    assert got == [
        "[heatmaps] shard 1/2: 50/100 images, 10 img/s",
        "[retrain: oracle] DFR: C=1",
        "WARNING mlflow.store: [retrain: oracle] slow",
    ], got
