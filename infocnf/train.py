"""The training loop: Adam with a configured schedule, checkpoints, exact resume and callbacks."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .checkpoints import (
    capture_rng_state,
    check_config_hash,
    load_checkpoint,
    prepare_output_dir,
    restore_rng_state,
    save_checkpoint,
)
from .config import RunConfig, config_hash, save_config
from .data import DataSplits, dequantize, iterate_batches, load_splits, random_horizontal_flip
from .distributed import join_process_group
from .evaluate import evaluate, fit_diagonal_gaussian_bpd
from .model import ConditionalCNF, build_model
from .solve import SolveError
from .tolerance import FixedPlan, LearnedPolicy, TolerancePolicy, build_policy

__all__ = [
    "Trainer",
    "TrainResult",
    "TrainerCallback",
    "train_run",
    "resolve_device",
    "learning_rate_at",
    "seed_everything",
    "RUN_STATUSES",
]

log = logging.getLogger(__name__)

# Outcomes of a run: "finished", or the failure that ended it.
# Files a run writes in its output folder besides config.toml and checkpoints/.
RUN_OUTPUTS = ("metrics.json", "history.csv", "tolerances.csv")

RUN_STATUSES = ("finished", "diverged", "step_size_underflow", "step_budget_exceeded", "non_finite", "timeout", "out_of_memory")


class TrainerCallback(Protocol):
    """Receives training events; every method is optional."""

    def on_start(self, trainer: Trainer) -> None: ...
    def on_iteration(self, trainer: Trainer, iteration: int, iterations_per_epoch: int) -> None: ...
    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None: ...
    def on_end(self, trainer: Trainer, result: TrainResult) -> None: ...


@dataclass
class TrainResult:
    """Outcome of a run: status ("finished" or a failure kind), reason, final metrics, history rows."""

    status: str
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    """Map train.device to a device: "auto" is the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"invalid train.device = {name!r}: no CUDA device is available; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate_at(config: RunConfig, epoch: int, iteration: int) -> float:
    """Learning rate at a 0-based epoch and global iteration: linear warm-up, then step decay."""
    cfg = config.train
    lr = cfg.lr * cfg.lr_decay_factor ** sum(1 for e in cfg.lr_decay_epochs if epoch >= e)
    if cfg.warmup_iters and iteration < cfg.warmup_iters:
        lr *= (iteration + 1) / cfg.warmup_iters
    return lr


def _quantiles(values: list[float], prefix: str) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values, dtype=float)
    return {
        f"{prefix}_mean": float(arr.mean()),
        f"{prefix}_std": float(arr.std()),
        f"{prefix}_q10": float(np.quantile(arr, 0.1)),
        f"{prefix}_q50": float(np.quantile(arr, 0.5)),
        f"{prefix}_q90": float(np.quantile(arr, 0.9)),
    }


class Trainer:
    """Train one run: the model, its tolerance policy, Adam, and checkpoints under ``output_dir``."""

    def __init__(
        self,
        config: RunConfig,
        output_dir: str | Path,
        callbacks: list[Any] | None = None,
        splits: DataSplits | None = None,
    ):
        self.config = config
        self.output_dir = Path(output_dir)
        self.callbacks = list(callbacks or [])
        # Under torchrun: this rank's place in the data-parallel run; None in a single process.
        self.data_parallel = join_process_group(config.train.device)
        self.device = self.data_parallel.device if self.data_parallel else resolve_device(config.train.device)
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        seed_everything(config.seed)
        self.splits = (splits or load_splits(config.data)).to(self.device)
        self.model: ConditionalCNF = build_model(
            config, self.splits.shape, self.splits.levels, self.splits.num_classes
        ).to(self.device)
        self.policy: TolerancePolicy = build_policy(config.solver.tolerance, self.model.block_shapes).to(self.device)
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr_scale": 1.0}]
        self.optimizer = torch.optim.Adam(groups, lr=config.train.lr, weight_decay=config.train.weight_decay)
        self.gate_optimizer: torch.optim.Optimizer | None = None
        gate_params = [p for p in self.policy.parameters() if p.requires_grad]
        if gate_params:
            tolerance = config.solver.tolerance
            gate_group = [{"params": gate_params, "lr_scale": tolerance.gate_lr / config.train.lr}]
            if tolerance.gate_optimizer == "sgd":
                self.gate_optimizer = torch.optim.SGD(gate_group, lr=config.train.lr, momentum=0.9)
            else:
                self.gate_optimizer = torch.optim.Adam(gate_group, lr=config.train.lr)
        if self.data_parallel:
            self.data_parallel.wrap(self.model, self.policy, config.train.batch_size, config.seed)
        self.epoch = 0  # Epochs completed.
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {}
        self.elapsed_s = 0.0
        self.config_hash = config_hash(config)

    @property
    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer] + ([self.gate_optimizer] if self.gate_optimizer is not None else [])

    # Checkpoints -------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def _state(self) -> dict[str, Any]:
        return {
            "config_hash": self.config_hash,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "policy": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "gate_optimizer": self.gate_optimizer.state_dict() if self.gate_optimizer else None,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "history": self.history,
            "best": self.best,
            "elapsed_s": self.elapsed_s,
            "rng": capture_rng_state(),
        }

    def _save(self, name: str, state: dict[str, Any] | None = None) -> None:
        if self.data_parallel and not self.data_parallel.is_main:
            return
        save_checkpoint(state or self._state(), self.checkpoint_dir / name)

    def resume(self) -> bool:
        """Load checkpoints/last.pt if present; returns whether training resumes from it."""
        path = self.checkpoint_dir / "last.pt"
        state = self._load(path)
        if state is None:
            return False
        check_config_hash(state, self.config_hash, path, self.config.to_dict())
        self.model.load_state_dict(state["model"])
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.gate_optimizer is not None:
            self.gate_optimizer.load_state_dict(state["gate_optimizer"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.history, self.best, self.elapsed_s = state["history"], state["best"], state["elapsed_s"]
        restore_rng_state(state["rng"])
        if self.epoch >= self.config.train.epochs:
            log.info("resumed from %s after its last epoch (%d): only the final evaluation runs", path, self.epoch)
        else:
            log.info("resumed from %s after epoch %d", path, self.epoch)
        return True

    def _load(self, path: Path) -> dict[str, Any] | None:
        # Under torchrun rank 0 reads the file and sends it to the other ranks.
        if self.data_parallel:
            return self.data_parallel.load(path)
        return load_checkpoint(path, self.device)

    # Events ----------------------------------------------------------------------------------

    def _emit(self, event: str, *args: Any) -> None:
        if self.data_parallel and not self.data_parallel.is_main:
            return
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                method(self, *args)

    # Training --------------------------------------------------------------------------------

    def _train_epoch(self, deadline: float | None) -> dict[str, float]:
        cfg = self.config
        self.model.train()
        self.policy.train()
        sums: dict[str, float] = {"loss": 0.0, "examples": 0.0}
        # Sums of nll_bpd and cross_entropy times the batch size, and of misclassified examples. They
        # stay on the device until the epoch ends, so that logging them costs no host-device sync.
        device_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        nfe_fwd, nfe_bwd = [], []
        block_fwd, block_bwd, block_tols = [], [], []
        batches = iterate_batches(
            self.splits.train, cfg.train.batch_size, shuffle=True, seed=cfg.seed * 100_003 + self.epoch, drop_last=True
        )
        per_epoch = max(1, len(self.splits.train) // cfg.train.batch_size)
        for step, (images, labels) in enumerate(batches):
            lr = learning_rate_at(cfg, self.epoch, self.iteration)
            for optimizer in self._optimizers:
                for group in optimizer.param_groups:
                    # The gates follow the same schedule, scaled to their own base rate.
                    group["lr"] = lr * group["lr_scale"]
            x = dequantize(images, self.splits.levels)
            if self.splits.flip_train:
                x = random_horizontal_flip(x)
            plan = self.policy.plan(cfg.solver, deadline)
            if self.data_parallel:
                # Every rank dequantises the whole global batch alike, then keeps its own rows.
                x, labels = self.data_parallel.shard(x, labels)
                out, loss, parts, loss_value = self.data_parallel.forward(x, labels, plan, self.iteration)
            else:
                out = self.model(x, labels, plan)
                loss, parts = self.model.loss(out, labels)
                loss_value = float(loss.detach())
            if not math.isfinite(loss_value) or loss_value > cfg.train.divergence_threshold:
                raise _Diverged(f"training loss {loss_value:g} at epoch {self.epoch + 1}, iteration {self.iteration}")
            total = loss
            policy_loss = self.policy.policy_loss(plan, out.stats, loss)
            if policy_loss is not None:
                total = total + policy_loss
            for optimizer in self._optimizers:
                optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.train.grad_clip > 0:
                # The flow's gradient only: the gates' REINFORCE gradient has its own scale.
                torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], cfg.train.grad_clip
                )
            for optimizer in self._optimizers:
                optimizer.step()
            self.iteration += 1

            count = labels.shape[0]
            sums["loss"] += loss_value * count
            sums["examples"] += count
            device_sums[0] += torch.as_tensor(parts["nll_bpd"]).detach().double() * count
            if "cross_entropy" in parts:
                device_sums[1] += torch.as_tensor(parts["cross_entropy"]).detach().double() * count
                device_sums[2] += (out.logits.argmax(1) != labels).sum()
            # Backward NFE is known only now, after loss.backward().
            nfe_fwd.append(sum(s.nfe_forward for s in out.stats))
            nfe_bwd.append(sum(s.nfe_backward for s in out.stats))
            block_fwd.append([s.nfe_forward for s in out.stats])
            block_bwd.append([s.nfe_backward for s in out.stats])
            block_tols.append([math.log10(s.atol) for s in out.stats])
            self._emit("on_iteration", step + 1, per_epoch)

        n = sums["examples"]
        sums["nll_bpd"], sums["cross_entropy"], sums["errors"] = device_sums.tolist()
        row = {
            "train_loss": sums["loss"] / n,
            "train_bits_per_dim": sums["nll_bpd"] / n,
            "train_nfe_forward": float(np.mean(nfe_fwd)),
            "train_nfe_backward": float(np.mean(nfe_bwd)),
        }
        if self.model.head.conditional:
            row["train_cross_entropy"] = sums["cross_entropy"] / n
            row["train_error"] = sums["errors"] / n
        for i, (f, b) in enumerate(zip(np.mean(block_fwd, axis=0), np.mean(block_bwd, axis=0))):
            row[f"train_nfe_forward_block_{i}"] = float(f)
            row[f"train_nfe_backward_block_{i}"] = float(b)
        if isinstance(self.policy, LearnedPolicy):
            for i, column in enumerate(np.array(block_tols).T):
                row.update(_quantiles(list(column), f"train_log10_tol_block_{i}"))
        if self.data_parallel:
            row = self.data_parallel.reduce_train_row(row, n)
        return row

    @contextlib.contextmanager
    def _policy_frozen(self):
        # Gates in eval mode: their BatchNorm layers must not update running statistics on
        # validation or test batches.
        was_training = self.policy.training
        self.policy.eval()
        try:
            yield
        finally:
            self.policy.train(was_training)

    def _evaluate(self, split_name: str, tolerance: float, observer=None) -> dict[str, float]:
        split = getattr(self.splits, split_name)
        with self._policy_frozen():
            return self._evaluate_unfrozen(split, tolerance, observer)

    def _evaluate_unfrozen(self, split, tolerance: float, observer) -> dict[str, float]:
        # Under torchrun each rank scores its part of the split and the results are merged once.
        run = self.data_parallel.evaluate if self.data_parallel else evaluate
        return run(
            self.model,
            split,
            lambda: FixedPlan(self.config.solver, tolerance=tolerance),
            self.config.train.eval_batch_size,
            seed=self.config.seed + 7,
            observer=observer,
        )

    def _gate_observer(self, draws: int = 1) -> tuple[Any, dict[int, list[float]]]:
        """Build an observer that samples each gate's tolerance on evaluation data without using it."""
        samples: dict[int, list[float]] = {}
        policy = self.policy
        if not isinstance(policy, LearnedPolicy):
            return None, samples

        def observe(block: int, x: torch.Tensor) -> None:
            mean, log_std = policy.distribution(block, x)
            values = (mean + log_std.exp() * torch.randn(draws, device=mean.device)).clamp(
                policy.log10_min, policy.log10_max
            )
            samples.setdefault(block, []).extend(values.tolist())

        return observe, samples

    def _write_tolerance_samples(self) -> dict[str, float]:
        """Sample every gate on train and test batches into tolerances.csv; return per-block means."""
        import pandas as pd

        rows, means = [], {}
        for split_name in ("train", "test"):
            observer, samples = self._gate_observer(draws=20)
            with self._policy_frozen():
                evaluate(
                    self.model,
                    getattr(self.splits, split_name),
                    lambda: FixedPlan(self.config.solver, tolerance=self.config.solver.eval_tolerance),
                    self.config.train.batch_size,
                    seed=self.config.seed + 11,
                    observer=observer,
                )
            for block, values in sorted(samples.items()):
                rows.extend({"split": split_name, "block": block, "log10_tolerance": v} for v in values)
                means[f"{split_name}_log10_tol_block_{block}_mean"] = float(np.mean(values))
        if not self.data_parallel or self.data_parallel.is_main:
            pd.DataFrame(rows).to_csv(self.output_dir / "tolerances.csv", index=False)
        return means

    def _select_value(self, val: dict[str, float]) -> float:
        # Model selection uses the validation split only: the training objective at eval tolerance.
        return val["loss"]

    def fit(self, resume: bool = True) -> TrainResult:
        """Train to the configured number of epochs, then evaluate the selected model on test.

        With ``resume``, an interrupted run of the same config in the output folder goes on from
        its checkpoints/last.pt. Without it, the folder's checkpoints and results are deleted first.
        """
        cfg = self.config
        is_main = not self.data_parallel or self.data_parallel.is_main
        if is_main:
            prepare_output_dir(self.output_dir, resume, RUN_OUTPUTS)
        if resume:
            self.resume()
        # Written after the checkpoint check, so that a rejected config leaves the folder's config.toml alone.
        if is_main:
            save_config(cfg, self.output_dir / "config.toml")
        self._emit("on_start")
        started = time.monotonic()
        base_elapsed = self.elapsed_s
        limit = cfg.train.time_limit_s
        # Solves check this monotonic deadline, so a run stuck in one slow solve still stops.
        deadline = started + (limit - base_elapsed) if limit > 0 else None
        try:
            while self.epoch < cfg.train.epochs:
                row = {"epoch": self.epoch + 1, "lr": learning_rate_at(cfg, self.epoch, self.iteration)}
                row.update(self._train_epoch(deadline))
                self.epoch += 1
                last = self.epoch == cfg.train.epochs
                if self.epoch % cfg.train.eval_every == 0 or last:
                    val = self._evaluate("val", cfg.solver.eval_tolerance)
                    row.update({f"val_{k}": v for k, v in val.items()})
                    observer, samples = self._gate_observer()
                    test = self._evaluate("test", cfg.solver.eval_tolerance, observer)
                    row.update({f"test_{k}": v for k, v in test.items()})
                    for block, values in sorted(samples.items()):
                        row.update(_quantiles(values, f"test_log10_tol_block_{block}"))
                    if not self.best or self._select_value(val) < self.best["select_value"]:
                        self.best = {"select_value": self._select_value(val), "epoch": self.epoch}
                        self._save("best.pt")
                self.elapsed_s = base_elapsed + (time.monotonic() - started)
                if self.data_parallel:
                    # Rank 0's clock decides the time limit, so every rank stops at the same epoch.
                    self.elapsed_s = self.data_parallel.from_main(self.elapsed_s)
                row["elapsed_s"] = self.elapsed_s
                self.history.append(row)
                if self.epoch % cfg.train.checkpoint_every == 0 or last:
                    self._save("last.pt")
                self._write_history()
                self._emit("on_epoch_end", row)
                if cfg.train.time_limit_s and self.elapsed_s > cfg.train.time_limit_s and not last:
                    raise SolveError("timeout", f"the run passed train.time_limit_s = {cfg.train.time_limit_s:g} s")
            metrics = self._final_metrics()
            result = TrainResult("finished", "", metrics, self.history)
        except SolveError as exc:
            result = self._failed(exc.status, exc.message)
        except _Diverged as exc:
            result = self._failed("diverged", f"{exc}; lower train.lr or tighten train.grad_clip")
        except torch.cuda.OutOfMemoryError as exc:
            result = self._failed("out_of_memory", f"{exc}; lower train.batch_size or set solver.adjoint = true")
        self._write_metrics(result)
        self._emit("on_end", result)
        return result

    def _failed(self, status: str, reason: str) -> TrainResult:
        log.warning("run failed at epoch %d with status %s: %s", self.epoch + 1, status, reason)
        return TrainResult(status, reason, {"status": status, "reason": reason, "epochs_completed": self.epoch}, self.history)

    def _final_metrics(self) -> dict[str, Any]:
        cfg = self.config
        state = self._load(self.checkpoint_dir / "best.pt")
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.policy.load_state_dict(state["policy"])
        metrics: dict[str, Any] = {"status": "finished", "selected_epoch": self.best.get("epoch", self.epoch)}
        val = self._evaluate("val", cfg.solver.eval_tolerance)
        metrics.update({f"val_{k}": v for k, v in val.items()})
        test = self._evaluate("test", cfg.solver.eval_tolerance)
        metrics.update({f"test_{k}": v for k, v in test.items()})
        metrics["eval_tolerance"] = cfg.solver.eval_tolerance
        metrics["extra_eval_tolerances"] = list(cfg.solver.extra_eval_tolerances)
        # The same selected model at tighter tolerances: the metrics should not move.
        for tol in cfg.solver.extra_eval_tolerances:
            extra = self._evaluate("test", tol)
            for key in ("bits_per_dim", "bits_per_dim_marginal", "error", "nfe_forward"):
                metrics[f"test_{key}_at_{tol:g}"] = extra[key]
        if isinstance(self.policy, LearnedPolicy):
            with self._policy_frozen():
                mean_eval = evaluate(
                    self.model,
                    self.splits.test,
                    lambda: self.policy.mean_plan(cfg.solver),
                    cfg.train.eval_batch_size,
                    seed=cfg.seed + 7,
                )
            for key in ("bits_per_dim", "error", "nfe_forward", "tolerance_min", "tolerance_max"):
                metrics[f"test_{key}_at_gate_mean"] = mean_eval[key]
            metrics.update(self._write_tolerance_samples())
        train_rows = [r for r in self.history if "train_nfe_forward" in r]
        metrics["train_nfe_forward"] = float(np.mean([r["train_nfe_forward"] for r in train_rows]))
        metrics["train_nfe_backward"] = float(np.mean([r["train_nfe_backward"] for r in train_rows]))
        metrics["baseline_diag_gaussian_test_bits_per_dim"] = fit_diagonal_gaussian_bpd(
            self.splits.train, self.splits.test, self.splits.levels, cfg.data.alpha, seed=cfg.seed
        )
        metrics["elapsed_s"] = self.elapsed_s
        metrics["epochs_completed"] = self.epoch
        metrics["num_parameters"] = sum(p.numel() for p in self.model.parameters())
        metrics["config_hash"] = self.config_hash
        metrics["device"] = str(self.device)
        return metrics

    def _write_history(self) -> None:
        if self.data_parallel and not self.data_parallel.is_main:
            return
        import pandas as pd

        pd.DataFrame(self.history).to_csv(self.output_dir / "history.csv", index=False)

    def _write_metrics(self, result: TrainResult) -> None:
        if self.data_parallel and not self.data_parallel.is_main:
            return
        path = self.output_dir / "metrics.json"
        tmp = path.with_suffix(".tmp")
        # Strict JSON: NaN (a metric that does not apply, such as an unconditional model's error) becomes null.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.metrics.items()}
        tmp.write_text(json.dumps(clean, indent=2, sort_keys=True, default=float, allow_nan=False) + "\n")
        os.replace(tmp, path)


class _Diverged(RuntimeError):
    pass


def train_run(config: RunConfig, output_dir: str | Path, callbacks: list[Any] | None = None, resume: bool = True) -> TrainResult:
    """Train one run end to end and write its config, history, metrics and checkpoints."""
    return Trainer(config, output_dir, callbacks).fit(resume=resume)
