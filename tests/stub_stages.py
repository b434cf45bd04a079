"""Stand-ins for the stages' `run()`, for tests of how the graph is run (keys, folders, switches) without the work:
each writes its params and the file digests of its inputs, so its output depends on exactly what the real stage's
would, and nothing else (no paths)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

from tidlq import graph
from tidlq.core import cache, files

SWITCHES = {"quant.mode": ["ptq", "qat"], "verify.baseline": ["ort", "none"], "sensitivity.enabled": [True, False]}
COMBINATIONS = [dict(zip(SWITCHES, values, strict=True)) for values in itertools.product(*SWITCHES.values())]


def combination_id(switches: dict) -> str:
    """A test id for one combination of switches."""
    return "-".join(map(str, switches.values()))


def stub_run(stage: graph.Stage) -> Callable[..., dict]:
    """The stand-in `run(*params, *input_folders, out)` of `stage`."""
    def run(*args: object) -> dict:
        *values, out = args
        inputs = [None if v is None else files.read_json(Path(str(v)) / cache.MANIFEST)["files"]
                  for v in values[len(stage.params):]]
        files.write_json(Path(str(out)) / "out.json", {"stage": stage.name, "params": values[:len(stage.params)],
                                                       "inputs": inputs})
        return {"ran": stage.name}
    return run
