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
    assert any("[gpu]" in c for c in raw["setup_commands"])
    assert any("mlflow server" in c and "--port 5000" in c for c in raw["head_start_ray_commands"])
