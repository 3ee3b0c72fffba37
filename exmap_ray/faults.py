"""Deliberate fault injection, for the fault tests and for drills on a real cluster.

Set EXMAP_RAY_FAULTS to a JSON file holding a list of faults, before Ray starts
(Ray's worker processes inherit the environment):

    [{"point": "trial", "when": {"clustering.k": 3}, "times": 1, "message": "injected"}]

At a named point, the code calls `inject(point, context)`; a fault whose `when`
items all match the context raises `InjectedFault` for its first `times` hits
(counted across processes with exclusive-create files beside the plan, so a
retried Tune trial sees the count of earlier attempts). Without the variable,
`inject` returns at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "EXMAP_RAY_FAULTS"


class InjectedFault(RuntimeError):
    """A fault raised on purpose by an EXMAP_RAY_FAULTS plan."""


def inject(point: str, context: dict | None = None) -> None:
    plan_path = os.environ.get(ENV)
    if not plan_path or not os.path.exists(plan_path):  # a test may arm the plan later, by writing it
        return
    context = context or {}
    for i, fault in enumerate(json.loads(Path(plan_path).read_text())):
        if fault.get("point") != point:
            continue
        if any(str(context.get(k)) != str(v) for k, v in fault.get("when", {}).items()):
            continue
        for n in range(int(fault.get("times", 1))):
            try:
                os.close(os.open(f"{plan_path}.hit-{i}-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            raise InjectedFault(f"{fault.get('message', 'injected fault')} (fault {i} at '{point}', hit {n + 1})")


def hits(plan_path: str | Path, index: int) -> int:
    """How many times fault `index` of a plan has fired."""
    return len(list(Path(plan_path).parent.glob(f"{Path(plan_path).name}.hit-{index}-*")))
