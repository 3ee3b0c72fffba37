"""cluster.yaml passes Ray's own autoscaler schema and keeps the promises the README makes."""
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_validates_with_ray_schema():
    raw = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(raw))  # raises on any schema violation
    assert raw["available_node_types"]["head"]["resources"]["CPU"] == 0  # the head trains nothing
    assert raw["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1
    setup = raw["setup_commands"]
    uninstall = next(i for i, c in enumerate(setup) if "uninstall" in c and "faiss-cpu" in c)
    gpu = next(i for i, c in enumerate(setup) if "install" in c and "faiss-gpu" in c and "uninstall" not in c)
    assert uninstall < gpu  # the GPU build goes in after faiss-cpu is gone (they share the module's files)
    mlflow = next(c for c in raw["head_start_ray_commands"] if "mlflow server" in c and "pkill" not in c)
    assert "--port 5000" in mlflow and "--artifacts-destination s3://" in mlflow and "0.0.0.0" not in mlflow
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)  # token auth on every node
    assert "--dashboard-host=127.0.0.1" in starts[0]  # reached through the SSH tunnel only
    for node in raw["available_node_types"].values():  # S3 through an instance profile, not keys
        assert node["node_config"]["IamInstanceProfile"]["Name"]
    assert raw["docker"]["image"].count(":") == 1 and "latest" not in raw["docker"]["image"]  # pinned
