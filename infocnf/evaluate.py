"""Evaluation of a model on a split at a fixed tolerance: bits/dim, test error and NFE."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .data import Split, dequantize, iterate_batches
from .metrics import count_errors
from .model import ConditionalCNF
from .tolerance import TolerancePlan

__all__ = ["evaluate", "fit_diagonal_gaussian_bpd"]


@torch.no_grad()
def evaluate(
    model: ConditionalCNF,
    split: Split,
    make_plan: Callable[[], TolerancePlan],
    batch_size: int,
    seed: int,
    observer: Callable[[int, torch.Tensor], None] | None = None,
) -> dict[str, float]:
    """Score every example of ``split`` (no batch is dropped) and return means over examples.

    The dequantisation noise and Hutchinson probes come from a generator seeded with ``seed``
    inside a forked RNG, so repeated evaluations see the same noise and the training RNG stream
    is untouched (which keeps resumed runs exact). ``observer(block, block_input)`` is called for
    each block solve, for example to record what a tolerance gate would choose on this data.

    Returns bits_per_dim (of log p(x | y)), bits_per_dim_marginal, loss, error (fraction, or NaN
    for unconditional models), nfe_forward (mean per batch, summed over blocks), per-block forward
    NFE as nfe_forward_block_<i>, and the tolerances used.
    """
    was_training = model.training
    model.eval()
    devices = [split.images.device] if split.images.device.type == "cuda" else []
    totals = {"bpd": 0.0, "bpd_marginal": 0.0, "loss": 0.0, "errors": 0}
    nfe_per_batch, nfe_blocks, tolerances = [], [], set()
    n = len(split)
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for images, labels in iterate_batches(split, batch_size, shuffle=False):
                x = dequantize(images, model.levels)
                plan = make_plan()
                if observer is not None:
                    plan = _Observed(plan, observer)
                out = model(x, labels, plan)
                loss, _ = model.loss(out, labels)
                count = labels.shape[0]
                totals["bpd"] += float(out.bits_per_dim.sum())
                totals["bpd_marginal"] += float(out.bits_per_dim_marginal.sum())
                totals["loss"] += float(loss) * count
                if out.logits is not None:
                    totals["errors"] += int(count_errors(out.logits, labels))
                nfe_per_batch.append(sum(s.nfe_forward for s in out.stats))
                nfe_blocks.append([s.nfe_forward for s in out.stats])
                tolerances.update(s.atol for s in out.stats)
    finally:
        model.train(was_training)
    result = {
        "bits_per_dim": totals["bpd"] / n,
        "bits_per_dim_marginal": totals["bpd_marginal"] / n,
        "loss": totals["loss"] / n,
        # Divide by the number of examples scored, which is all of them: no batch is dropped.
        "error": totals["errors"] / n if model.head.conditional else float("nan"),
        "nfe_forward": float(np.mean(nfe_per_batch)),
    }
    for i, value in enumerate(np.mean(np.array(nfe_blocks, dtype=float), axis=0)):
        result[f"nfe_forward_block_{i}"] = float(value)
    result["tolerance_min"] = min(tolerances)
    result["tolerance_max"] = max(tolerances)
    return result


class _Observed:
    """A plan wrapper that reports each block input to an observer before delegating."""

    def __init__(self, plan: TolerancePlan, observer: Callable[[int, torch.Tensor], None]):
        self.plan = plan
        self.observer = observer

    def __call__(self, block: int, x: torch.Tensor):
        self.observer(block, x)
        return self.plan(block, x)


def fit_diagonal_gaussian_bpd(
    train: Split, test: Split, levels: int, alpha: float, seed: int = 0
) -> float:
    """Test bits/dim of a diagonal Gaussian fitted by maximum likelihood to the training data.

    The Gaussian is fitted in the same logit space the flow models, to the same uniformly
    dequantised images, and scored with the logit log-det, so it is the flow's score with the
    dynamics switched off and an affine per-pixel map fitted in their place.
    """
    from .metrics import bits_per_dim
    from .transforms import logit_transform

    generator = torch.Generator(device=train.images.device).manual_seed(seed)
    y_train, _ = logit_transform(dequantize(train.images, levels, generator), alpha)
    y_train = y_train.reshape(len(train), -1).double()
    mean, std = y_train.mean(dim=0), y_train.std(dim=0, unbiased=False).clamp_min(1e-6)
    y_test, log_det = logit_transform(dequantize(test.images, levels, generator), alpha)
    y_test = y_test.reshape(len(test), -1).double()
    log_p = torch.distributions.Normal(mean, std).log_prob(y_test).sum(dim=1) + log_det.double()
    return float(bits_per_dim(log_p, y_test.shape[1], levels).mean())
