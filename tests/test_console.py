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
RAY_NOISE = ("TrainingReport", "Reporting training result", "(RayTrainWorker", "(TrainController", "pid=",
             "\x1b[", "Trial status", "Checkpoint successfully created")


def _run(tmp_path, *args):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_dict()))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "exmap_ray", "run", str(spec), "--cache", str(tmp_path / "cache"),
                           *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_console_of_a_run_by_default_and_quiet(tmp_path):
    out, err = _run(tmp_path, "--out", str(tmp_path / "run"))
    both = out + err
    assert not [n for n in RAY_NOISE if n in both], both
    # each stage's own lines, named by their stage or row; progress of the long stages from the driver
    lines = err.splitlines()
    for pattern in (r"\[erm\] epoch 1/1: loss \d\.\d{4}, train acc \d\.\d{3}, val acc \d\.\d{3}, \d+ img/s$",
                    r"\[heatmaps\] shard 1/3: 100/300 images, \d+ img/s$",
                    r"\[heatmaps\] shard 3/3: 300/300 images, \d+ img/s$",
                    r"\[clusters\] clustering: spectral/global -> \d+ pseudo groups",
                    r"\[retrain: ExMap\] DFR: C=", r"\[retrain: oracle\] DFR: C="):
        assert [ln for ln in lines if re.search(pattern, ln)], (pattern, err)
    # every line of ours says where it belongs: "HH:MM:SS [stage or row] ..."
    untagged = [ln for ln in lines if not re.match(r"\d\d:\d\d:\d\d (WARNING )?\[[a-z][^]]*\] ", ln)]
    assert not untagged, untagged
    assert "test WGA" in out and "oracle DFR (true val groups)" in out

    # --quiet, every stage from the cache: the result table on stdout, nothing on stderr but warnings
    q_out, q_err = _run(tmp_path, "--out", str(tmp_path / "quiet"), "--quiet")
    assert all(" WARNING " in ln or "Warning" in ln for ln in q_err.splitlines() if ln.strip()), q_err
    assert q_out.lstrip().startswith("method") and "oracle DFR (true val groups)" in q_out
    table = out[out.index("method"):out.index("results:")]
    assert table in q_out  # the same table as the default console's (same cached stages)


def test_ray_token_auth_notice_only_under_verbose(capfd):
    """The notice comes from Ray's own function (ray.init on a new local Ray calls it); Ray's warning that
    auth is disabled stays a warning at every level."""
    from ray._private.authentication import authentication_token_setup as auth

    try:
        for level, shown in ((console.NORMAL, False), (console.QUIET, False), (console.VERBOSE, True)):
            console.configure(level)
            auth._warn_token_auth_enabled()
            auth._warn_token_auth_disabled()
            err = capfd.readouterr().err
            assert (console.RAY_AUTH_NOTICE in err) is shown, (level, err)
            assert "Token authentication is disabled" in err
    finally:
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
    assert got == ["[heatmaps] shard 1/2: 50/100 images, 10 img/s", "[retrain: oracle] DFR: C=1",
                   "WARNING mlflow.store: [retrain: oracle] slow"], got
