"""Per-stage time on one node vs the simulated 3-node cluster, and the bytes each stage moves through storage.

    python benchmarks/cluster_stages.py                         # the cluster tests' tiny spec
    python benchmarks/cluster_stages.py tune_specs/cmnist.yaml  # the demo spec (needs root: unshare + tmpfs)

The cluster is the one `tests/cluster` uses (tests/cluster/local_cluster.py): a 0-CPU head, two worker
nodes in their own mount namespaces, moto's S3 server and MLflow on 127.0.0.1, token auth on. The same
spec runs once on a local Ray with a local folder, and once through `ray job submit` with
`--out s3://...`; both with resources.worker_cpus=1, so they compute the same thing. Prints a table;
asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.local_cluster import LocalCluster  # noqa: E402


def single_node(spec: str, out: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "exmap_ray.cli",
            "run",
            spec,
            "--out",
            str(out),
            "--quiet",
            "--set",
            "resources.worker_cpus=1",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
        env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled"},
    )
    return json.loads((out / "results.json").read_text()), time.perf_counter() - t0


def stage_bytes(c: LocalCluster, prefix: str) -> dict[str, int]:
    from pyarrow import fs as pafs

    s3 = pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        scheme="http",
        endpoint_override=f"127.0.0.1:{c.s3_port}",
    )
    sizes: dict[str, int] = defaultdict(int)
    for info in s3.get_file_info(pafs.FileSelector(f"exmap/{prefix}", recursive=True)):
        if info.type == pafs.FileType.File:
            rel = info.path.removeprefix(f"exmap/{prefix}/")
            top = rel.split("/")[0]
            sizes[top.split("-")[0] if "-" in top and not top.startswith("records") else top] += info.size
    return dict(sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="tests/cluster/tiny.yaml")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="exmap-bench-"))
    local, local_wall = single_node(args.spec, work / "single")
    c = LocalCluster([work])
    try:
        t0 = time.perf_counter()
        c.start()
        up = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = c.submit(
            f"exmap-ray run {args.spec} --quiet --out '{c.s3_uri('run')}' "
            f"--cache '{c.s3_uri('cache')}' --tracking-uri {c.tracking_uri} --set resources.worker_cpus=1"
        )
        wall = time.perf_counter() - t0
        if r.returncode:
            sys.exit((r.stdout + r.stderr)[-4000:])
        from pyarrow import fs as pafs

        s3 = pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            scheme="http",
            endpoint_override=f"127.0.0.1:{c.s3_port}",
        )
        with s3.open_input_stream("exmap/run/results.json") as f:
            remote = json.loads(f.read())
        cache_bytes, run_bytes = stage_bytes(c, "cache"), stage_bytes(c, "run")
    finally:
        c.stop()
    same = all(remote[k]["test"] == local[k]["test"] for k in ("erm", "robust", "oracle_dfr"))
    print(f"spec {args.spec}; cluster start {up:.1f} s; same test metrics on both: {same}")
    print(f"wall time of the command: single node {local_wall:.1f} s, cluster job {wall:.1f} s (job submit included)\n")
    print("| stage | single node (s) | 3-node cluster, S3 (s) | bytes written to storage |")
    print("|---|---|---|---|")
    for stage, t in local["timings_s"].items():
        b = cache_bytes.get(stage)
        print(
            f"| {stage} | {t:.2f} | {remote['timings_s'].get(stage, float('nan')):.2f} | "
            f"{'' if b is None else f'{b:,}'} |"
        )
    print(f"| records (claims log) | | | {cache_bytes.get('records', 0):,} |")
    print(f"| run folder (results, plots, selection, spec) | | | {sum(run_bytes.values()):,} |")


if __name__ == "__main__":
    main()
