"""The benchmark's targets: solver plus harness overhead and MLflow logging overhead, met or not."""

from __future__ import annotations

__all__ = ["OVERHEAD_LIMIT", "MLFLOW_LIMIT", "evaluate_targets"]

# An iteration should cost NFE times one field evaluation; everything else is overhead.
OVERHEAD_LIMIT = 0.10
MLFLOW_LIMIT = 0.02


def _reference_split(results: dict) -> tuple[dict, dict] | None:
    settings = results["settings"]
    for cell in results.get("profile", {}).get("cells", []):
        if cell["batch_size"] == settings["reference_batch"] and cell["tolerance"] == settings["reference_tolerance"]:
            return cell, cell["split"]
    return None


def _row(name: str, value: float | None, limit: float | None, where: str, missing: str) -> dict:
    """Build one table row. When ``value`` is None, ``missing`` is the reason and replaces ``where``."""
    return {
        "name": name,
        "value": value,
        "measured": "n/a" if value is None else f"{100 * value:.1f} %",
        "limit": "-" if limit is None else f"<= {100 * limit:.0f} %",
        "met": None if value is None or limit is None else value <= limit,
        "where": f"not measured ({missing})" if value is None else where,
    }


def _missing_reference(results: dict) -> str:
    settings = results["settings"]
    if "profile" not in results:
        return "profile section not run"
    return (
        f"no profiled cell at batch {settings['reference_batch']}, tolerance {settings['reference_tolerance']:g}"
    )


def evaluate_targets(results: dict) -> list[dict]:
    """Compute each target's measured share from a results record; ``met`` is None when not measured."""
    settings = results["settings"]
    where = f"digits, batch {settings['reference_batch']}, tolerance {settings['reference_tolerance']:g}"
    reference = _reference_split(results)
    solver = reference[1]["overhead_share"] if reference else None
    harness = results.get("harness")
    trainer = harness["trainer_overhead_share"] if harness else None
    cost = reference[0].get("field_cost", {}).get("overhead_share") if reference else None
    floor = reference[0].get("field_cost", {}).get("floor_share") if reference else None
    missing_profile = _missing_reference(results) if reference is None else ""
    missing_harness = "harness section not run"
    rows = [
        _row("solver, loss and optimizer overhead (profiled minimal loop)", solver, None,
             where + ", one profiled iteration", missing_profile),
        _row("the same, cost model without the profiler", cost, None, where + ", NFE x field cost timed alone",
             missing_profile or "the profiled cell has no cost model"),
        _row(
            "lower bound: the same loop with each solve replaced by an Euler chain of equal NFE",
            floor,
            None,
            where + ", cost model; what no solver can remove",
            missing_profile or "the profiled cell has no Euler-chain timing",
        ),
        _row("Trainer overhead over the minimal loop", trainer, None, where + ", paired timed iterations",
             missing_harness),
    ]
    combined = None
    if solver is not None and trainer is not None:
        # The field's share of a trainer iteration is its share of the minimal loop, scaled by the
        # loop's time over the trainer's. A negative trainer overhead is timing noise and counts as 0.
        combined = 1 - (1 - solver) * (1 - max(trainer, 0.0))
    missing_combined = missing_profile if solver is None else missing_harness
    rows.append(_row("solver + harness overhead", combined, OVERHEAD_LIMIT,
                     where + ", the profiled minimal-loop and Trainer rows combined", missing_combined))
    if floor is not None and trainer is not None:
        rows.append(_row(
            "lower bound of solver + harness overhead",
            1 - (1 - floor) * (1 - max(trainer, 0.0)),
            None,
            where + ", the Euler-chain and Trainer rows combined: the overhead with a solver that costs nothing",
            "",
        ))
    mlflow = harness.get("mlflow") if harness else None
    rows.append(_row(
        "MLflow logging overhead",
        mlflow["share_of_fit"] if mlflow else None,
        MLFLOW_LIMIT,
        f"{where}, MLflow callback time over Trainer.fit wall time",
        # The harness section records an empty mlflow entry when run with --no-mlflow.
        "MLflow off" if harness else missing_harness,
    ))
    return rows
