"""Whether torch.compile of the vector field runs and pays off, in training and in evaluation solves."""

from __future__ import annotations

import time

import torch

from infocnf.data import dequantize
from infocnf.tolerance import FixedPlan

from .environment import synchronize
from .timing import summarize
from .workloads import TrainingStep, Workload

__all__ = ["measure_compile"]


def _swap_fields(step: TrainingStep, compiled: bool, originals: list) -> None:
    for block, original in zip(step.model.flow.blocks, originals):
        block.field = torch.compile(original) if compiled else original


def _time_evaluation(step: TrainingStep, images, labels, repeats: int) -> tuple[list[float], torch.Tensor, int]:
    plan_options = step.config.solver
    times, log_prob, nfe = [], None, 0
    for _ in range(repeats):
        # Seeded, so that eager and compiled solves draw the same Hutchinson probes.
        torch.manual_seed(0)
        x = dequantize(images, step.workload.levels, generator=torch.Generator().manual_seed(0))
        synchronize(step.device)
        started = time.perf_counter()
        with torch.no_grad():
            out = step.model(x, labels, FixedPlan(plan_options, tolerance=step.tolerance))
        synchronize(step.device)
        times.append(time.perf_counter() - started)
        log_prob, nfe = out.log_prob, sum(s.nfe_forward for s in out.stats)
    return times, log_prob, nfe


def measure_compile(workload: Workload, batch_size: int, tolerance: float, device: torch.device, repeats: int = 5) -> dict:
    """Compare eager and torch.compile'd fields: one training iteration, and evaluation solves.

    Training differentiates the Hutchinson vector-Jacobian product (create_graph=True), which
    needs a double backward through the field. Evaluation needs only a first-order backward.
    Returns the outcome of each, with wall-clock medians and the compile time (first call).
    """
    step = TrainingStep(workload, batch_size, tolerance, device)
    step()
    originals = [block.field for block in step.model.flow.blocks]
    images, labels = step.images[:batch_size], step.labels[:batch_size]
    result: dict = {"batch_size": batch_size, "tolerance": tolerance, "torch": torch.__version__}

    _swap_fields(step, True, originals)
    try:
        step()
        result["training"] = {"runs": True}
    except Exception as exc:  # Dynamo and AOTAutograd raise several types; the message is the result.
        result["training"] = {"runs": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    finally:
        _swap_fields(step, False, originals)
        torch._dynamo.reset()

    eager, eager_log_prob, eager_nfe = _time_evaluation(step, images, labels, repeats)
    _swap_fields(step, True, originals)
    try:
        started = time.perf_counter()
        _time_evaluation(step, images, labels, 1)
        compile_s = time.perf_counter() - started
        compiled, compiled_log_prob, compiled_nfe = _time_evaluation(step, images, labels, repeats)
        result["evaluation"] = {
            "runs": True,
            "eager_s": summarize(eager).as_dict(),
            "compiled_s": summarize(compiled).as_dict(),
            "first_call_s": compile_s,
            "speedup": summarize(eager).median / summarize(compiled).median,
            "nfe_forward": [eager_nfe, compiled_nfe],
            "max_abs_log_prob_difference": float((eager_log_prob - compiled_log_prob).abs().max()),
        }
    except Exception as exc:  # As above: report the failure as the outcome.
        result["evaluation"] = {"runs": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
    finally:
        _swap_fields(step, False, originals)
        torch._dynamo.reset()
    return result
