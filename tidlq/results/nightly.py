"""The nightly's decisions: which models it runs (each checked before any run starts), each model's result read
from its flow run and its MLflow run, and the verdict against its champion (the alias moved when beaten)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tidlq.core.errors import NightlyFailed, UserError
from tidlq.core.params import NightlyParams, load_params
from tidlq.results import regression, tracking


def entries(params_path: str, nightly_params: NightlyParams) -> list[dict[str, Any]]:
    """The models of the nightly, each checked now (bad params fail the nightly before any run starts)."""
    raw = list(nightly_params.models)
    if nightly_params.models_file:
        raw += _read_models_file(Path(nightly_params.models_file))
    if not raw:
        raise UserError("nightly: no models. List them under nightly.models (or in nightly.models_file).")
    models, names = [], set()
    for i, overrides in enumerate(raw):
        try:
            model_params = load_params(params_path, overrides)
        except UserError as exc:
            raise UserError(f"nightly model {i + 1} ({overrides}): {exc}") from None
        name = model_params.model.display_name
        if name in names:
            raise UserError(f"nightly: two models are both named {name!r}; give one a model.name of its own.")
        names.add(name)
        models.append({"name": name, "overrides": overrides, "experiment": model_params.tracking.experiment})
    return models


def judge_all(models: list[dict[str, Any]], runs: list[Any], nightly_params: NightlyParams) -> list[dict[str, Any]]:
    """Every model's result (from its ended flow run) and verdict, in the order of `models`."""
    return [judge(outcome(model, run), nightly_params) for model, run in zip(models, runs, strict=True)]


def outcome(model: dict[str, Any], run: Any) -> dict[str, Any]:
    """A model's result: its flow run's end state and, from its MLflow run, its numbers."""
    from mlflow import MlflowClient

    result = {"name": model["name"], "flow_run_id": str(run.id), "state": run.state.type.value,
              "message": run.state.message or "", "reasons": []}
    client = MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name(model["experiment"])
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{run.id}'",
                               max_results=1) if experiment else []
    if found:
        m = found[0].data.metrics
        result |= {"mlflow_run_id": found[0].info.run_id, "accuracy": m.get("int8.accuracy"),
                   "accuracy_drop": m.get("accuracy_drop"), "sqnr_db": m.get("int8.sqnr_db"),
                   "gate_passed": m.get("gate.passed") == 1.0}
    return result


def judge(result: dict[str, Any], nightly_params: NightlyParams) -> dict[str, Any]:
    """failed (the run did not complete), or the regression verdict against the champion (moved when beaten)."""
    if result["state"] != "COMPLETED" or result.get("accuracy") is None:
        why = result["message"] or f"the flow run ended {result['state']}"
        return result | {"status": "failed", "reasons": [why[:500]]}
    from mlflow import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    best = regression.champion(client, result["name"])
    verdict = regression.verdict(result, best, nightly_params.accuracy_tolerance, nightly_params.sqnr_tolerance_db)
    if verdict["promote"]:
        verdict["champion_now"] = regression.promote(client, result["name"], result["mlflow_run_id"])
    return result | {"champion": best, **verdict}


def check(results: list[dict[str, Any]]) -> None:
    """Fail the nightly, naming every model that failed or regressed."""
    bad = [f"{r['name']} {r['status']}: {'; '.join(r['reasons'])}" for r in results
           if r["status"] in ("failed", "regressed")]
    if bad:
        raise NightlyFailed(f"{len(bad)} of {len(results)} models failed or regressed: " + " | ".join(bad))


def _read_models_file(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"nightly.models_file {str(path)!r} not found.")
    models = yaml.safe_load(path.read_text()) or []
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise UserError(f"nightly.models_file {str(path)!r}: expected a list of mappings of dotted params overrides.")
    return models
