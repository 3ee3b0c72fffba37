"""The storage root on a real S3 endpoint (moto's server on 127.0.0.1), its checks, and stage claims."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from exmap_ray.errors import UserError
from exmap_ray.storage import Loc, check_root
from exmap_ray.cache import StageCache
from exmap_ray.storage import load_npy, read_json, save_npy, write_json

from .cluster.local_cluster import BIN, free_port, wait_port

pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[dev]')")


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on the loopback, with one bucket; yields a URI maker."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    try:
        wait_port(port, 60, "moto server", proc)
        from pyarrow import fs as pafs

        pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            scheme="http",
            endpoint_override=f"127.0.0.1:{port}",
            allow_bucket_creation=True,
        ).create_dir("bkt")
        yield (
            lambda prefix, bucket="bkt": (
                f"s3://{bucket}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
            )
        )
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_loc_reads_and_writes_the_same_on_disk_and_on_s3(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("EXMAP_RAY_NODE_CACHE", str(tmp_path / "node-cache"))
    for root in (Loc.parse(tmp_path / "local"), Loc.parse(s3("loc"))):
        assert Loc.parse(str(root)) == root  # the string form is what tasks and actors receive
        write_json(root / "a" / "x.json", {"v": 1})
        save_npy(root / "a" / "m.npy", np.arange(6.0).reshape(2, 3))
        assert read_json(root / "a" / "x.json") == {"v": 1}
        np.testing.assert_array_equal(load_npy(root / "a" / "m.npy", mmap=True), np.arange(6.0).reshape(2, 3))
        assert sorted(p.name for p in root.glob("*/*.json")) == ["x.json"]
        assert (root / "a").is_dir() and (root / "a" / "x.json").is_file() and not (root / "b").exists()
        (root / "a").rmtree()
        assert not (root / "a" / "x.json").exists()
    # remote files are read through the node-local derived cache, never written next to the driver
    assert any((tmp_path / "node-cache").rglob("m.npy"))
    with pytest.raises(TypeError, match="not a local file"):
        open(Loc.parse(s3("loc")) / "y")  # a remote location handed to open() fails loudly


@pytest.mark.parametrize(
    "bad, says",
    [
        ("foo://bucket/x", "storage URI 'foo://bucket/x' cannot be used"),
        ("/proc/x/y", "'/proc/x/y' cannot be written"),
    ],
)
def test_unusable_local_or_unknown_roots_are_refused(bad, says):
    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        check_root(bad)


def test_a_refused_connection_on_a_port_holding_403_is_not_called_a_credential_error():
    """CI once drew port 40367 for the dead endpoint: the "403" in it read as HTTP 403 Forbidden."""
    from exmap_ray.storage import _probe_hint

    loc = Loc.parse("s3://bkt/x?endpoint_override=127.0.0.1:40367&scheme=http")
    dead = (
        "oserror: when initiating multiple part upload for key 'x/p' in bucket 'bkt': aws error "
        "network_connection during createmultipartupload operation: curlcode: 7, could not connect to server; "
        "details: failed to connect to 127.0.0.1 port 40367 after 0 ms: could not connect to server"
    )
    assert "endpoint does not answer" in _probe_hint(dead, loc)
    assert "credentials are refused" in _probe_hint("aws error access_denied: http 403, forbidden", loc)
    assert "credentials are refused" in _probe_hint("unexpected status code: 403 for put", loc)


def test_unusable_s3_roots_are_refused_in_seconds_naming_them(s3):
    with pytest.raises(UserError, match="the bucket does not exist"):
        check_root(s3("x", bucket="no-such-bucket"))
    dead = f"s3://bkt/x?endpoint_override=127.0.0.1:{free_port()}&scheme=http&region=us-east-1"
    with pytest.raises(UserError, match="endpoint does not answer|no answer from the storage endpoint"):
        check_root(dead)
    secret = s3("x", bucket="no-such-bucket") + "&access_key=AKIAXX&secret_key=SECRETXX"
    with pytest.raises(UserError) as e:
        check_root(secret)
    assert "SECRETXX" not in str(e.value) and "secret_key=***" in str(e.value)  # no credential in messages


def test_refused_or_missing_s3_credentials_are_named(tmp_path):
    """moto with authentication on (INITIAL_NO_AUTH_ACTION_COUNT=0): unknown keys are refused."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 60, "moto server", proc)
        uri = f"s3://bkt/x?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        probe = [
            sys.executable,
            "-c",
            "import sys; from exmap_ray.storage import check_root; check_root(sys.argv[1])",
            uri,
        ]
        base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        for env, says in (
            ({"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "x"}, "credentials are refused"),
            ({"HOME": str(tmp_path)}, "no S3 credentials were found"),
        ):
            r = subprocess.run(
                probe,
                env={**base, "AWS_EC2_METADATA_DISABLED": "true", **env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert r.returncode != 0 and says in r.stderr, r.stderr[-1500:]
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_refuses_bad_out_and_dead_ray_address_before_any_work(s3, tmp_path, capsys):
    """`exmap-ray run` in this process (its console script's exit code and clean stderr are tested in
    tests/faults/test_bad_input.py): each bad root or address is named before Ray, torch or the data load."""
    from exmap_ray.cli import main

    cases = [
        (["--out", "/proc/x/y"], "'/proc/x/y' cannot be written"),
        (["--out", "foo://bucket/x"], "storage URI 'foo://bucket/x' cannot be used"),
        (["--out", s3("x", bucket="no-such-bucket")], "the bucket does not exist"),
        (["--out", s3("x")], "needs a tracking server that every node can reach"),
        (["--out", str(tmp_path / "o"), "--address", f"127.0.0.1:{free_port()}"], "does not answer"),
    ]
    for args, says in cases:
        capsys.readouterr()
        rc = main(["run", "--quiet", *args])
        err = capsys.readouterr().err
        assert rc == 2 and says in err and "Traceback" not in err, (args, err[-2000:])
    assert not (tmp_path / "o" / "results.json").exists()


def _claimant(root: str, marker_root: str, i: int, gate) -> str:
    """A Ray task that needs the same stage as its siblings: at most one may compute it. Each signals
    the `gate` actor at the claim (past the `done` check, before it tries to claim); whichever computes
    holds the claim until all have arrived, so the others are then waiting on it, not racing it."""
    import ray as _ray

    from exmap_ray.claims import RayClaims
    from exmap_ray.cache import StageCache as _SC

    class Arriving:
        def __init__(self, inner):
            self.inner = inner

        def hold(self, stage):
            _ray.get(gate.arrive.remote())
            return self.inner.hold(stage)

    cache = _SC(root, claims=Arriving(RayClaims(Loc.parse(root))))
    st = cache.stage("heatmaps", {"m": "lrp"})

    def compute(d):
        (Loc.parse(marker_root) / f"computed-{i}").write_text("x")
        _ray.get(gate.all_arrived.remote(), timeout=120)
        (d / "shard-00000.npy").write_text("data")
        return {"by": i}

    return cache.run(st, compute)["by"]


class Gate:
    """Counts claimants arriving at a claim; `all_arrived` returns once `n` have (an async actor)."""

    def __init__(self, n: int):
        import asyncio

        self.n, self.arrived, self.event = n, 0, asyncio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.n:
            self.event.set()

    async def all_arrived(self) -> None:
        await self.event.wait()


# The session's Ray started before the `s3` fixture set the credentials, so its workers get them
# through their runtime env, as a cluster job would. (Without them the SDK sends anonymous
# aws-chunked uploads, which moto stores undecoded and real S3 refuses.)
S3_ENV = {
    "env_vars": {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
}


def test_concurrent_claimants_on_s3_compute_a_stage_once(s3, ray_local):
    root, markers = s3("claims/cache"), s3("claims/markers")
    task = ray_local.remote(_claimant).options(num_cpus=0.25, runtime_env=S3_ENV)
    gate = ray_local.remote(Gate).options(num_cpus=0).remote(4)
    winners = ray_local.get([task.remote(root, markers, i, gate) for i in range(4)])
    assert len(set(winners)) == 1  # every claimant got the one result
    assert len(list(Loc.parse(markers).iterdir())) == 1
    events = sorted(r["event"] for r in StageCache(root).records())
    assert events == ["computed", "reused", "reused", "reused"]


def _dies_holding_claim(root: str) -> None:
    from exmap_ray.cache import StageCache as _SC

    cache = _SC(root)

    def compute(d):
        (d / "partial.npy").write_text("half")
        os._exit(1)  # the process dies mid-stage, holding the claim

    cache.run(cache.stage("clusters", {"k": 2}), compute)


def test_a_dead_holders_claim_is_taken_over_and_its_partial_output_cleared(s3, ray_local):
    root = s3("takeover/cache")
    lease = {"env_vars": {**S3_ENV["env_vars"], "EXMAP_RAY_CLAIM_LEASE_S": "2"}}  # 60 s by default
    ref = ray_local.remote(_dies_holding_claim).options(num_cpus=0.25, max_retries=0, runtime_env=lease).remote(root)
    with pytest.raises(Exception):
        ray_local.get(ref)
    cache = StageCache(root)
    st = cache.stage("clusters", {"k": 2})
    assert (st.dir / "partial.npy").exists() and not st.done
    info = cache.run(st, lambda d: {"ok": True})  # waits out the dead holder's lease, then computes
    assert info["ok"] and st.done and not (st.dir / "partial.npy").exists()
    assert [r["event"] for r in cache.records()] == ["computed"]
