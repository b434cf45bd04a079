"""Autopilot (`quant.mode: auto`): try a small grid of PTQ recipes, keep the best; fall back to QAT when none passes.

The grid is preset x calibration observer x bias correction (params `autopilot`), with the params' own PTQ recipe
always in it, so the autopilot never ends worse than the default. The winner is the recipe with the highest logit
SQNR among those that pass the quality gate (ties: accuracy, then grid order). When none passes, QAT starts from the
best PTQ recipe's preset, and the final choice is the best of everything tried: first whether it passed, then SQNR.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tidlq.core import files
from tidlq.core.params import AutopilotParams, Params, QuantParams

if TYPE_CHECKING:
    from tidlq.runner import Outcome, StageRunner

LAST = "verify_onnx"  # each recipe runs up to its verification; the winner then goes on to the bundle


@dataclass(frozen=True)
class Candidate:
    """One recipe of the grid: a label for tables and MLflow, and the quant section it runs with."""

    label: str
    quant: QuantParams

    @classmethod
    def of(cls, quant: QuantParams) -> Candidate:
        """A candidate named after its recipe."""
        return cls(label(quant), quant)


def search(stages: StageRunner, params: Params) -> Outcome:
    """Run the grid's recipes (stage by stage, `autopilot.max_parallel` at a time) up to their verification, keep
    the best (QAT from the best PTQ recipe when none passes the gate), and build the rest of the pipeline for the
    winner; its outcome, with the choice and why."""
    candidates = grid(params.quant, params.autopilot)
    built = stages.run([with_recipe(params, c) for c in candidates], until=LAST, labels=[c.label for c in candidates])
    choice = choose(candidates, [verified(m) for m in built], candidates[0].label)
    if not choice["passed"]:
        best = next(c for c in candidates if c.label == choice["winner"])
        qat = Candidate.of(best.quant.model_copy(update={"mode": "qat"}))
        built += stages.run([with_recipe(params, qat)], until=LAST, labels=[qat.label])
        candidates.append(qat)
        choice = choose(candidates, [verified(m) for m in built], candidates[0].label)
    winner = next(c for c in candidates if c.label == choice["winner"])
    return stages.outcome(with_recipe(params, winner), choice)


def with_recipe(params: Params, candidate: Candidate) -> Params:
    """The params with a candidate's quant section."""
    return params.model_copy(update={"quant": candidate.quant})


def verified(manifests: dict[str, Any]) -> dict[str, Any]:
    """A recipe's verify.json."""
    return files.read_json(manifests[LAST].path("verify.json"))


def grid(quant: QuantParams, autopilot: AutopilotParams) -> list[Candidate]:
    """The PTQ recipes to try, the params' own recipe first, without duplicates."""
    base = quant.model_copy(update={"mode": "ptq"})
    combos = itertools.product(autopilot.presets, autopilot.observers, autopilot.bias_correction)
    recipes = [base] + [base.model_copy(update={"qconfig": preset, "observer": observer, "bias_correction": bias})
                        for preset, observer, bias in combos]
    unique: dict[str, Candidate] = {}
    for recipe in recipes:
        unique.setdefault(label(recipe), Candidate.of(recipe))
    return list(unique.values())


def label(quant: QuantParams) -> str:
    """`tidl-histogram`, `tidl-minmax-bc`, `qat-tidl`: what a recipe is called in tables and MLflow."""
    if quant.mode == "qat":
        return f"qat-{quant.qconfig}"
    observer = f"{quant.observer}{quant.percentile:g}" if quant.observer == "percentile" else quant.observer
    return f"{quant.qconfig}-{observer}" + ("-bc" if quant.bias_correction else "")


def choose(candidates: list[Candidate], results: list[dict[str, Any]], default: str) -> dict[str, Any]:
    """The winner among the recipes tried and why; `results` are their verify.json contents, in the same order."""
    rows = [row(c, r) for c, r in zip(candidates, results, strict=True)]
    order = {r["label"]: i for i, r in enumerate(rows)}
    best = max(rows, key=lambda r: (r["gate_passed"], r["sqnr_db"], r["accuracy"], -order[r["label"]]))
    default_row = next(r for r in rows if r["label"] == default)
    if best["gate_passed"]:
        passed = sum(r["gate_passed"] for r in rows)
        reason = (f"{best['label']}: the highest logit SQNR ({best['sqnr_db']:.1f} dB) of the {passed} of "
                  f"{len(rows)} recipes that passed the gate; the default recipe {default} reached "
                  f"{default_row['sqnr_db']:.1f} dB")
    else:
        reason = (f"no recipe passed the gate; {best['label']} came closest ({best['sqnr_db']:.1f} dB, drop "
                  f"{best['accuracy_drop']:.2f} points)")
    return {"winner": best["label"], "passed": best["gate_passed"], "reason": reason, "default": default,
            "candidates": rows}


def row(candidate: Candidate, result: dict[str, Any]) -> dict[str, Any]:
    """A recipe's line in the autopilot table."""
    q = candidate.quant
    return {"label": candidate.label, "mode": q.mode, "qconfig": q.qconfig, "observer": q.observer,
            "bias_correction": q.bias_correction, "accuracy": result["int8"]["accuracy"],
            "accuracy_drop": result["accuracy_drop"], "agreement": result["int8"]["agreement"],
            "sqnr_db": result["int8"]["sqnr_db"], "gate_passed": result["gate"]["passed"]}
