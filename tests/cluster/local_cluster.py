"""A multi-node Ray cluster on this one machine whose nodes share no disk, plus S3 and MLflow servers.

- an S3 endpoint: moto's server, on 127.0.0.1 only (as Ray's own storage tests use);
- a Ray head with 0 CPUs (token authentication on, dashboard on 127.0.0.1);
- an MLflow server on the head (SQLite backend, artifacts in the bucket, proxied: clients need
  no S3 credentials), on 127.0.0.1;
- worker nodes, each started in its own mount namespace (`unshare --mount`, root) with a private
  tmpfs over the test's whole temp tree and Ray's default temp folder, so no node can read what
  another wrote locally, as two cloud machines would not.

Teardown stops only the processes this object started, by their process ids.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
BUCKET = "exmap"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g} s")


def can_run() -> str | None:
    """None when this machine can host the cluster, else why not (the tests then skip, saying so)."""
    if os.geteuid() != 0:
        return "needs root for unshare --mount and tmpfs (CI runs as root)"
    if not shutil.which("unshare"):
        return "needs util-linux unshare"
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return "needs moto[server] (pip install -e '.[dev]')"
    return None


class LocalCluster:
    def __init__(self, hide: list[Path], n_workers: int = 2, worker_cpus: int = 2, worker_gpus: dict | None = None):
        """`hide`: folders the worker nodes must not see (besides this cluster's own base folder, a short
        path under /tmp: Ray's socket paths must stay under the 107-byte limit of Unix sockets).
        `worker_gpus`: logical GPUs of some worker nodes, {worker index: count} (the head has none)."""
        import tempfile

        self.base = Path(tempfile.mkdtemp(prefix="xr-", dir="/tmp"))
        self.hide = [*hide, self.base]
        self.n_workers, self.worker_cpus, self.worker_gpus = n_workers, worker_cpus, worker_gpus or {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.s3_port, self.mlflow_port = free_port(), free_port()
        self.logs = self.base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ addresses

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def s3_uri(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{self.s3_port}&scheme=http&region=us-east-1"

    def env(self, **extra) -> dict:
        """The environment of every node, server and client: token auth on, S3 credentials as an
        instance profile would give them, nothing reaching out of this machine."""
        e = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "EXMAP_RAY_FAULTS"))}
        e.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            PATH=f"{BIN}:{e.get('PATH', '')}",
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
            RAY_USAGE_STATS_ENABLED="0",
            TQDM_DISABLE="1",
            RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2",
            RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="0",
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
            PYTHONUNBUFFERED="1",
        )
        e.pop("RAY_ADDRESS", None)  # set for the nodes, the raylets fail to start (Ray 2.60)
        e.update(extra)
        return e

    @staticmethod
    def node_ports() -> list[str]:
        """Ports of a node's agents, free ones: every node here shares one machine, so Ray's fixed defaults
        (52365 for the dashboard agent and others) would collide between nodes and with other Ray instances."""
        return [
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    # ------------------------------------------------------------------ start

    def start(self) -> "LocalCluster":
        """Servers and nodes start side by side: only the workers wait for the head."""
        head_dir = self.base / "head"
        (head_dir / "cache").mkdir(parents=True, exist_ok=True)
        s3 = self._spawn(
            "moto", [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)], self.env()
        )
        # the server needs the bucket only when the first artifact arrives, made below
        mlf = self._spawn(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{head_dir / 'mlflow.db'}",
                "--artifacts-destination",
                f"s3://{BUCKET}/mlartifacts",
            ],
            self.env(
                MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{self.s3_port}", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"
            ),
        )  # as cluster.yaml: no huey workers
        # the GCS checks each node every second and gives it up after 3 missed checks (Ray's defaults:
        # 3 s and 5): a killed node is noticed in seconds, so the node-loss test does not wait on it
        head_env = self.env(
            EXMAP_RAY_NODE_CACHE=str(head_dir / "cache"),
            RAY_health_check_period_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        self.head_started = True
        r = subprocess.run(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                f"--port={self.gcs_port}",
                "--num-cpus=0",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dash_port}",
                f"--temp-dir={head_dir / 'ray'}",
                "--disable-usage-stats",
                *self.node_ports(),
            ],
            env=head_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode:
            raise RuntimeError(f"ray start --head failed:\n{(r.stdout + r.stderr)[-3000:]}")
        wait_port(self.s3_port, 60, "moto server", s3)
        self._make_bucket()
        # one worker node at a time, each started again if it gives up: Ray allows a starting raylet a fixed
        # 30 s to register with the GCS (ray/_private/node.py), which a loaded 2-core machine can miss
        for i in range(self.n_workers):
            self.start_worker(i)
            self.wait_nodes(i + 2, 300, worker=i)  # seconds on a quiet machine; bounds a hang
        wait_port(self.mlflow_port, 300, "mlflow server", mlf)  # about 10 s on a quiet machine
        return self

    def start_worker(self, i: int) -> None:
        """A worker node in its own mount namespace: tmpfs over the hidden tree, its own temp and cache."""
        node = self.base / f"exmap-node-{i}"  # exists only inside this node's tmpfs
        mounts = "".join(f"mount -t tmpfs -o size=4g tmpfs {h}; " for h in self.hide)
        script = (
            f"set -e; {mounts}"
            f"mkdir -p /tmp/ray && mount -t tmpfs -o size=1g tmpfs /tmp/ray; "
            f"mkdir -p {node}/ray {node}/cache; "
            # ahead of the machine's other processes: a starving node misses the registration window
            f"exec nice -n -5 {BIN / 'ray'} start --address={self.address} --num-cpus={self.worker_cpus} "
            f"--num-gpus={self.worker_gpus.get(i, 0)} "
            f"--node-ip-address=127.0.0.1 --temp-dir={node}/ray --block --disable-usage-stats "
            + " ".join(self.node_ports())
        )
        self._spawn(
            f"worker{i}",
            ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script],
            self.env(EXMAP_RAY_NODE_CACHE=f"{node}/cache"),
        )

    def _make_bucket(self) -> None:
        from pyarrow import fs as pafs

        s3 = pafs.S3FileSystem(
            access_key="testing",
            secret_key="testing",
            region="us-east-1",
            scheme="http",
            endpoint_override=f"127.0.0.1:{self.s3_port}",
            allow_bucket_creation=True,
        )
        s3.create_dir(BUCKET)

    def ray_cli(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            cwd=REPO,
        )

    def _get(self, path: str, timeout: float = 30):
        """GET a dashboard REST path with the cluster's token: the state and job queries poll through
        this in-process client, since each `ray` CLI call would cost seconds of CPU to start (the suite
        runs on 2 cores); the job is still submitted with the CLI, as the README shows."""
        import urllib.request

        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def nodes(self) -> list[dict]:
        """Alive nodes as the GCS sees them (Ray's state API behind the token-authenticated dashboard)."""
        got = self._get("/api/v0/nodes?limit=100&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE")
        return got["data"]["result"]["result"]

    def wait_nodes(self, n: int, timeout: float, worker: int | None = None, restarts: int = 2) -> None:
        """Until `n` nodes are alive. `worker`: the node being started, which is started again (up to
        `restarts` times) if its `ray start` exits, as it does when its raylet missed the registration window."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            proc = self.procs.get(f"worker{worker}")
            if worker is not None and proc is not None and proc.poll() is not None and restarts > 0:
                restarts -= 1
                mark = f"{self.base / f'exmap-node-{worker}'}/"  # its raylet and agents name their temp folder
                _terminate([pid for pid, cmd in _cmdlines().items() if mark in cmd and pid != os.getpid()])
                os.replace(self.logs / f"worker{worker}.log", self.logs / f"worker{worker}.failed-{restarts}.log")
                self.start_worker(worker)
            try:
                seen = len(self.nodes())
            except (OSError, ValueError, KeyError):  # the dashboard may not answer yet
                seen = 0
            if seen >= n:
                return
            time.sleep(1)
        tails = "".join(
            f"\n--- {f.name} (last lines)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:])
            for f in sorted(self.logs.glob("*.log"))
            if f.name.startswith(("head", "worker"))
        )
        raise RuntimeError(f"only {seen} of {n} Ray nodes came up within {timeout:g} s; logs in {self.logs}{tails}")

    def submit(
        self, entrypoint: str, *, wait: bool = True, timeout: float = 600, runtime_env: dict | None = None
    ) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir .` of the repository, as a user's laptop would (`runtime_env`:
        more of the job's runtime environment, e.g. env_vars for every process of the job)."""
        args = ["job", "submit", f"--address={self.dashboard}", f"--working-dir={REPO}"]
        if runtime_env:
            args.append(f"--runtime-env-json={json.dumps(runtime_env)}")
        if not wait:
            args.append("--no-wait")
        deadline = time.monotonic() + 60
        while True:  # the head's job agent may still be starting: Ray answers "No available agent"
            r = self.ray_cli(*args, "--", *shlex.split(entrypoint), timeout=timeout, check=False)
            if "No available agent" not in r.stderr + r.stdout or time.monotonic() > deadline:
                return r
            time.sleep(2)

    def job_id(self, submitted: subprocess.CompletedProcess) -> str:
        import re

        return re.search(r"Job '(raysubmit_\w+)' submitted", submitted.stdout + submitted.stderr).group(1)

    def job_status(self, job_id: str) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (Ray's job REST API); UNKNOWN if it does not answer."""
        try:
            return str(self._get(f"/api/jobs/{job_id}")["status"]).upper()
        except (OSError, ValueError, KeyError):
            return "UNKNOWN"

    def wait_job(self, job_id: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_status(job_id)
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                return state
            time.sleep(1)
        return "TIMEOUT"

    def job_logs(self, job_id: str) -> str:
        try:
            return self._get(f"/api/jobs/{job_id}/logs", timeout=60)["logs"]
        except (OSError, ValueError, KeyError) as e:
            return f"(job logs of {job_id} unavailable: {e})"

    def raylet_pid(self, i: int) -> int:
        """The raylet of worker node i: a descendant of the process this object started for it."""
        for pid in descendants(self.procs[f"worker{i}"].pid):
            if _comm(pid) == "raylet":
                return pid
        raise RuntimeError(f"worker node {i} has no raylet")

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        """Only what this object started, by process id: servers, worker nodes and the head, all at once
        (SIGTERM to all, one grace period, then SIGKILL to what is left)."""
        pids = [q for p in self.procs.values() for q in (p.pid, *descendants(p.pid))]
        if getattr(self, "head_started", False):
            # the head's processes are those whose command line names this cluster's own temp folder or GCS
            marks = (str(self.base / "head"), f"--gcs-address=127.0.0.1:{self.gcs_port}")
            pids += [pid for pid, cmd in _cmdlines().items() if pid != os.getpid() and any(m in cmd for m in marks)]
        _terminate(list(dict.fromkeys(pids)))


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _cmdlines() -> dict[int, str]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def proc_stats() -> dict[int, tuple[str, int, int, int]]:
    """Every process on the machine: pid -> (state, parent pid, process group, session), from /proc."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                out[int(d.name)] = (f[0], int(f[1]), int(f[2]), int(f[3]))
            except (OSError, IndexError, ValueError):
                pass
    return out


def descendants(root: int) -> list[int]:
    parent = {pid: st[1] for pid, st in proc_stats().items()}
    found, frontier = [], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _terminate(pids: list[int], grace: float = 5.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
