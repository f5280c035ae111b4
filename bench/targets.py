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


def _row(name: str, value: float | None, limit: float | None, where: str) -> dict:
    return {
        "name": name,
        "value": value,
        "measured": "n/a" if value is None else f"{100 * value:.1f} %",
        "limit": "-" if limit is None else f"<= {100 * limit:.0f} %",
        "met": None if value is None or limit is None else value <= limit,
        "where": where,
    }


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
    rows = [
        _row("solver, loss and optimizer overhead (profiled minimal loop)", solver, None, where + ", one profiled iteration"),
        _row("the same, cost model without the profiler", cost, None, where + ", NFE x field cost timed alone"),
        _row(
            "lower bound: the same loop with each solve replaced by an Euler chain of equal NFE",
            floor,
            None,
            where + ", cost model; what no solver can remove",
        ),
        _row("Trainer overhead over the minimal loop", trainer, None, where + ", paired timed iterations"),
    ]
    combined = None
    if solver is not None and trainer is not None:
        # The field's share of a trainer iteration is its share of the minimal loop, scaled by the
        # loop's time over the trainer's. A negative trainer overhead is timing noise and counts as 0.
        combined = 1 - (1 - solver) * (1 - max(trainer, 0.0))
    rows.append(_row("solver + harness overhead", combined, OVERHEAD_LIMIT, where + ", the profiled minimal-loop and Trainer rows combined"))
    if floor is not None and trainer is not None:
        rows.append(_row(
            "lower bound of solver + harness overhead",
            1 - (1 - floor) * (1 - max(trainer, 0.0)),
            None,
            where + ", the Euler-chain and Trainer rows combined: the overhead with a solver that costs nothing",
        ))
    mlflow = harness.get("mlflow") if harness else None
    rows.append(_row(
        "MLflow logging overhead",
        mlflow["share_of_fit"] if mlflow else None,
        MLFLOW_LIMIT,
        f"{where}, MLflow callback time over Trainer.fit wall time" if mlflow else "not measured (MLflow off)",
    ))
    return rows
