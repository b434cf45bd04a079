"""The nightly's regression check against each model's champion in the MLflow model registry.

A model's QDQ versions are registered as `<model>-qdq`; the alias `champion` marks the one to beat. A new run
regresses when its int8 accuracy or logit SQNR falls below the champion's by more than the tolerance; when it passed
the gate and is better (at least as good on both, strictly on one), the alias moves to it. The first gated run of a
model becomes champion.
"""

from __future__ import annotations

from typing import Any

CHAMPION = "champion"


def champion(client: Any, model: str) -> dict[str, Any] | None:
    """The champion version of `<model>-qdq` and its run's numbers; None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(f"{model}-qdq", CHAMPION)
    except MlflowException:
        return None
    metrics = client.get_run(version.run_id).data.metrics
    return {"version": str(version.version), "run_id": version.run_id, "accuracy": metrics["int8.accuracy"],
            "sqnr_db": metrics["int8.sqnr_db"]}


def verdict(new: dict[str, Any], best: dict[str, Any] | None, accuracy_tolerance: float,
            sqnr_tolerance_db: float) -> dict[str, Any]:
    """"regressed", "improved", "held" or "first" for a model's new numbers against its champion, with reasons."""
    if best is None:
        return {"status": "first", "reasons": [], "promote": new["gate_passed"]}
    reasons = []
    if new["accuracy"] < best["accuracy"] - accuracy_tolerance:
        reasons.append(f"int8 accuracy {new['accuracy']:.2f} % < champion v{best['version']} {best['accuracy']:.2f} % "
                       f"- {accuracy_tolerance}")
    if new["sqnr_db"] < best["sqnr_db"] - sqnr_tolerance_db:
        reasons.append(f"logit SQNR {new['sqnr_db']:.1f} dB < champion v{best['version']} {best['sqnr_db']:.1f} dB "
                       f"- {sqnr_tolerance_db}")
    if reasons:
        return {"status": "regressed", "reasons": reasons, "promote": False}
    not_worse = new["accuracy"] >= best["accuracy"] and new["sqnr_db"] >= best["sqnr_db"]
    better = not_worse and (new["accuracy"] > best["accuracy"] or new["sqnr_db"] > best["sqnr_db"])
    return {"status": "improved" if better else "held", "reasons": [], "promote": better and new["gate_passed"]}


def promote(client: Any, model: str, run_id: str) -> str:
    """Move the champion alias of `<model>-qdq` to the version that holds `run_id`'s QDQ model (the run's tag
    `registered_version`: a run whose model was already registered reuses that version); its version number."""
    from tidlq.results.tracking import VERSION_TAG

    version = client.get_run(run_id).data.tags[VERSION_TAG]
    client.set_registered_model_alias(f"{model}-qdq", CHAMPION, version)
    return version
