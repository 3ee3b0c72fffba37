"""Fault 6: the disk fills while heatmap shards are being written.

A real small filesystem (tmpfs in a user + mount namespace, no root needed) fills up
during extraction on a real local Ray. The error must say the disk is full and name the
file; nothing partial may remain that a later run would trust; once space is freed the
stage is computed afresh.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _namespace_ok(tmp: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp}"],
        capture_output=True,
    )
    return probe.returncode == 0


def test_disk_full_during_shards(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if not _namespace_ok(small):
        pytest.skip("needs `unshare --user --mount` to mount a small tmpfs (user namespaces are disabled here)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    cmd = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
        f"mount -t tmpfs -o size=1m tmpfs {small} && exec {sys.executable} "
        f"{REPO / 'tests/faults/disk_full_child.py'} {small} {tmp_path}",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, f"child failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    seen = json.loads(line[len("RESULT ") :])

    assert seen["first"].startswith("DiskFullError: disk full while writing"), seen["first"]
    assert "shard-" in seen["first"] or "pred-" in seen["first"]  # names the file it was writing
    assert "nothing partial will be reused" in seen["first"]
    # nothing partial is left: no stage folder, no shard, no temp file; only the cache's record of the failure
    assert len(seen["after_fail"]) == 1 and seen["after_fail"][0].startswith("cache/records/"), seen["after_fail"]
    assert not seen["done_after_fail"]
    # with space again, the stage is computed from scratch and complete
    assert seen["second_shards"] == 6 and seen["second_n"] == 300 and seen["second_finite"]
    assert seen["records"] == [["heatmaps", "failed"], ["heatmaps", "computed"]]
