"""Content hashes and derived seeds: the stage cache's keys and every stage's random stream.

Imports nothing of the project, so the store, the spec and the stages all import it from below.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(obj: Any, n: int = 12) -> str:
    """Content hash of a JSON-able object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def stage_seed(seed: int, stage: str) -> int:
    """A per-stage seed derived by hashing, so stages do not share random streams."""
    return int(hashlib.sha256(f"{seed}:{stage}".encode()).hexdigest()[:8], 16) % (2**31 - 1)


# The retrain step's seed name, for every retrainer: "dfr" because DFR was the first; renaming it would
# change every retrained head, so the name stays and the constant says what it is.
RETRAIN_SEED = "dfr"
