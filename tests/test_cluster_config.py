"""cluster.yaml passes Ray's own autoscaler schema and keeps the promises the README makes."""

import re
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"


def pins(path: Path) -> dict:
    lines = path.read_text().splitlines()
    return dict(ln.split("==", 1) for ln in lines if "==" in ln and not ln.startswith("#"))


def test_cluster_yaml_validates_with_ray_schema():
    raw = yaml.safe_load(CLUSTER.read_text())
    validate_config(prepare_config(raw))  # raises on any schema violation
    assert raw["available_node_types"]["head"]["resources"]["CPU"] == 0  # the head trains nothing
    assert raw["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1
    mlflow = next(c for c in raw["head_start_ray_commands"] if "mlflow server" in c and "pkill" not in c)
    assert "--port 5000" in mlflow and "--artifacts-destination s3://" in mlflow and "0.0.0.0" not in mlflow
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)  # token auth on every node
    assert "--dashboard-host=127.0.0.1" in starts[0]  # reached through the SSH tunnel only
    for node in raw["available_node_types"].values():  # S3 through an instance profile, not keys
        assert node["node_config"]["IamInstanceProfile"]["Name"]
    assert raw["docker"]["image"].count(":") == 1 and "latest" not in raw["docker"]["image"]  # pinned


def test_nodes_install_the_pinned_torch_for_the_stated_driver():
    """Every pip install of the project takes constraints.txt (torch 2.14.1 for CUDA 13.0, not the newest
    torch), and the driver the file asks for is the one CUDA 13 needs (>= 580; 570 was CUDA 12.8's)."""
    raw = yaml.safe_load(CLUSTER.read_text())
    text = CLUSTER.read_text()
    installs = [c for c in raw["setup_commands"] if "pip install" in c and "-e ." in c]
    assert installs and all("-c constraints.txt" in c for c in installs)
    pinned = pins(ROOT / "constraints.txt")
    assert pinned["torch"] == "2.14.1" and pinned["cuda-toolkit"].startswith("13.0.")
    from exmap_ray.resources import MIN_DRIVER

    assert MIN_DRIVER["13"].startswith("580.") and ">= 580" in text and ">= 570" not in text
    # each GPU node checks that torch sees CUDA before anything else it installs
    assert "require_cuda()" in raw["worker_setup_commands"][0]


def test_every_node_type_names_an_image_whose_driver_is_stated():
    """An ImageId on every node type (Ray's default AMI has a driver far too old): a real id, or the
    placeholder that EC2 refuses with its own text in the message (it does not start with 'ami-')."""
    raw = yaml.safe_load(CLUSTER.read_text())
    for name, node in raw["available_node_types"].items():
        ami = node["node_config"].get("ImageId", "")
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", ami) or (
            not ami.startswith("ami-") and "Deep-Learning-Base" in ami and "580" in ami
        ), (name, ami)
        assert ami.lower() not in ("", "latest_dlami"), name


def test_faiss_gpu_is_pinned_and_no_later_project_install_undoes_it():
    """faiss-gpu (pinned, with its CUDA 12 runtime wheels) goes over faiss-cpu's files with --no-deps, after
    the project's install, and faiss-cpu is never uninstalled: pip then keeps finding the dependency
    satisfied. The two wheels of that version ship the same file names (checked on the wheels by hand)."""
    raw = yaml.safe_load(CLUSTER.read_text())
    gpu_pins = pins(ROOT / "constraints-gpu.txt")
    assert gpu_pins["faiss-gpu"] == pins(ROOT / "constraints.txt")["faiss-cpu"]  # same version, same files
    for dep in ("nvidia-cuda-runtime-cu12", "nvidia-cublas-cu12", "nvidia-curand-cu12"):
        assert dep in gpu_pins
    steps = raw["setup_commands"] + raw["worker_setup_commands"]
    assert not any("uninstall" in c and "faiss" in c for c in steps)
    project = max(i for i, c in enumerate(steps) if "pip install" in c and "-e ." in c)
    faiss = next(i for i, c in enumerate(steps) if "pip install" in c and "faiss-gpu" in c)
    assert project < faiss and "--no-deps" in steps[faiss] and "-c constraints-gpu.txt" in steps[faiss]
    assert "StandardGpuResources" in steps[faiss + 1]  # and the module really is the GPU build
    node = raw["available_node_types"]["gpu_worker"]
    assert "worker_setup_commands" not in node  # it would replace setup_commands on that node type


def test_gpu_nodes_have_several_gpus_so_erm_workers_stay_on_one_node():
    raw = yaml.safe_load(CLUSTER.read_text())
    node = raw["available_node_types"]["gpu_worker"]
    assert node["resources"]["GPU"] >= 4 and node["resources"]["CPU"] >= 8 * node["resources"]["GPU"] // 2
