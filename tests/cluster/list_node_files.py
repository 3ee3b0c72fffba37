"""Run as a Ray job on the test cluster: on every worker node, list what is under the hidden tree.

Prints one JSON line: {node_id: [paths written outside Ray's own temp folder and the node cache]}.
Files in a node's copy of the job's working dir that are not in the repository count as written.
"""

import json
import os
import sys
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

HIDE, REPO_FILES = sys.argv[1], set(json.loads(Path(sys.argv[2]).read_text()) if len(sys.argv) > 2 else [])


def written_here(hide: str, repo_files: set) -> list:
    found = []
    for dirpath, dirnames, filenames in os.walk(hide):
        rel = Path(dirpath).relative_to(hide)
        parts = rel.parts
        if len(parts) >= 2 and parts[0].startswith("exmap-node-") and parts[1] == "cache":
            continue  # the node-local derived cache
        if "working_dir_files" in parts:  # a copy of the job's working dir: only the repository's files
            i = parts.index("working_dir_files")
            if len(parts) == i + 1:
                continue  # beside the copies: Ray's own bookkeeping (the package's .zip and its .lock)
            inner = parts[i + 2 :]
            found += [
                str(rel / f)
                for f in filenames
                if "/".join((*inner, f)) not in repo_files and "__pycache__" not in parts
            ]  # Python's bytecode cache: derived, rebuilt anywhere
            continue
        if len(parts) >= 2 and parts[0].startswith("exmap-node-") and parts[1] == "ray":
            continue  # Ray's own temp folder (logs, sockets, runtime envs)
        found += [str(rel / f) for f in filenames]
    return found


ray.init()
nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
refs = {
    n["NodeID"]: ray.remote(written_here)
    .options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
    .remote(HIDE, REPO_FILES)
    for n in nodes
}
print("NODE_FILES " + json.dumps({k: ray.get(v) for k, v in refs.items()}))
