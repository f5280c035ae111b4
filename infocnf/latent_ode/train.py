"""Training and evaluation of a LatentODE on spirals: Adam, per-epoch validation, final test metrics."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import (
    capture_rng_state,
    check_config_hash,
    load_checkpoint,
    prepare_output_dir,
    restore_rng_state,
    save_checkpoint,
)
from ..solve import SolveError, SolveOptions
from ..train import TrainResult, resolve_device, seed_everything
from .config import LatentODEConfig, LatentSolverConfig, load_latent_ode_config, save_latent_ode_config
from .figures import predict_trajectories, save_trajectories
from .model import LatentODE
from .spirals import SpiralSet, SpiralSplits, make_spiral_splits

__all__ = ["LatentODETrainer", "run_latent_ode", "evaluate_latent_ode", "probe_direction_error", "load_latent_ode", "solve_options"]

log = logging.getLogger(__name__)

# Files a run writes in its output folder besides config.toml and checkpoints/; the command line
# adds trajectories.png.
LATENT_ODE_OUTPUTS = ("metrics.json", "history.csv", "model.pt", "trajectories.npz", "trajectories.png")


def solve_options(config: LatentSolverConfig, evaluation: bool) -> SolveOptions:
    """SolveOptions for training solves (rtol, atol) or evaluation solves (eval_rtol, eval_atol)."""
    rtol, atol = (config.eval_rtol, config.eval_atol) if evaluation else (config.rtol, config.atol)
    return SolveOptions(atol=atol, rtol=rtol, method=config.method, max_num_steps=config.max_num_steps)


@torch.no_grad()
def evaluate_latent_ode(
    model: LatentODE, spirals: SpiralSet, solver: LatentSolverConfig, batch_size: int, extrapolate_points: int, seed: int
) -> dict[str, float]:
    """Score a model on one split at the evaluation tolerances.

    The ELBO terms use one z0 sample per spiral from a generator seeded with ``seed``. The
    mean squared errors decode the posterior mean of z0: ``mse_window`` against the noise-free
    window, ``mse_window_observed`` against the noisy points, and ``mse_forward`` and
    ``mse_backward`` against the noise-free ``extrapolate_points`` grid points after and before
    the window. ``error`` is the classifier's direction error (NaN without a partitioned prior).
    """
    model.eval()
    options = solve_options(solver, evaluation=True)
    device = spirals.observed.device
    window = spirals.window_points
    window_times = spirals.relative_times(window)
    ahead_times = spirals.relative_times(window + extrapolate_points)
    behind_times = spirals.relative_times(extrapolate_points + 1, backward=True)  # 0, -dt, ..., -P dt
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = {key: 0.0 for key in ("loss", "neg_elbo", "neg_elbo_per_value", "kl", "log_likelihood", "cross_entropy",
                                 "errors", "sq_window", "sq_observed", "sq_forward", "sq_backward", "nfe_forward")}
    batches = 0
    for start in range(0, len(spirals), batch_size):
        batch = spirals.subset(torch.arange(start, min(start + batch_size, len(spirals))))
        count = len(batch)
        out = model(batch.observed, window_times, batch.labels, options, sample=True, generator=generator)
        loss, parts = model.loss(out, batch.labels)
        sums["loss"] += float(loss) * count
        for key in ("neg_elbo", "neg_elbo_per_value", "kl", "log_likelihood"):
            sums[key] += float(parts[key]) * count
        sums["nfe_forward"] += out.stats.nfe_forward
        batches += 1

        ahead, _ = model.decode_path(out.mean, ahead_times, options)  # (batch, window + P, 2)
        behind, _ = model.decode_path(out.mean, behind_times, options)  # (batch, P + 1, 2), first at time 0
        truth_window = batch.segment(0, window)
        sums["sq_window"] += float((ahead[:, :window] - truth_window).pow(2).mean(dim=(1, 2)).sum())
        sums["sq_observed"] += float((ahead[:, :window] - batch.observed).pow(2).mean(dim=(1, 2)).sum())
        sums["sq_forward"] += float((ahead[:, window:] - batch.segment(window, extrapolate_points)).pow(2).mean(dim=(1, 2)).sum())
        # behind[:, k] is k grid steps before the window start, but segment() runs forwards in time.
        truth_behind = batch.segment(-extrapolate_points, extrapolate_points).flip(1)
        sums["sq_backward"] += float((behind[:, 1:] - truth_behind).pow(2).mean(dim=(1, 2)).sum())
        logits = model.logits(out.mean)
        if logits is not None:
            sums["cross_entropy"] += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
            sums["errors"] += float((logits.argmax(dim=1) != batch.labels).sum())
    n = len(spirals)
    metrics = {key: sums[key] / n for key in ("loss", "neg_elbo", "neg_elbo_per_value", "kl", "log_likelihood")}
    metrics.update(
        mse_window=sums["sq_window"] / n,
        mse_window_observed=sums["sq_observed"] / n,
        mse_forward=sums["sq_forward"] / n,
        mse_backward=sums["sq_backward"] / n,
        nfe_forward=sums["nfe_forward"] / batches,
        cross_entropy=sums["cross_entropy"] / n if model.partitioned else math.nan,
        error=sums["errors"] / n if model.partitioned else math.nan,
    )
    return metrics


@torch.no_grad()
def probe_direction_error(model: LatentODE, train: SpiralSet, test: SpiralSet, seed: int) -> float:
    """Test error of a logistic-regression probe fitted on the posterior means of z0 (all features).

    It measures the direction information in the whole latent for either prior, whereas the
    partitioned model's own classifier reads only z_y.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model.eval()
    features = []
    for spirals in (train, test):
        times = spirals.relative_times(spirals.window_points)
        mean, _ = model.encode(spirals.observed, times)
        features.append(mean.cpu().numpy())
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    probe.fit(features[0], train.labels.cpu().numpy())
    return float(np.mean(probe.predict(features[1]) != test.labels.cpu().numpy()))


class LatentODETrainer:
    """Train one LatentODE run and write its results under ``output_dir``.

    Callbacks receive the same events as infocnf.train.Trainer: on_start(trainer),
    on_iteration(trainer, iteration, iterations_per_epoch), on_epoch_end(trainer, row) and
    on_end(trainer, result).
    """

    def __init__(self, config: LatentODEConfig, output_dir: str | Path, callbacks: list[Any] | None = None,
                 splits: SpiralSplits | None = None):
        self.config = config
        self.output_dir = Path(output_dir)
        self.callbacks = list(callbacks or [])
        self.device = resolve_device(config.train.device)
        seed_everything(config.seed)
        self.splits = (splits or make_spiral_splits(config.data)).to(self.device)
        self.model = LatentODE(config.model, config.prior).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.train.lr)
        self.epoch = 0  # Epochs completed.
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        self.best: dict[str, Any] = {}
        self.elapsed_s = 0.0
        self.config_hash = config.hash()

    # Checkpoints -------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoints" / "last.pt"

    def _state(self) -> dict[str, Any]:
        return {
            "config_hash": self.config_hash,
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "history": self.history,
            "best": self.best,
            "elapsed_s": self.elapsed_s,
            "rng": capture_rng_state(),
        }

    def resume(self) -> bool:
        """Load checkpoints/last.pt if present; returns whether training resumes from it."""
        path = self.checkpoint_path
        state = load_checkpoint(path, self.device)
        if state is None:
            return False
        check_config_hash(state, self.config_hash, path, self.config.to_dict())
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.history, self.best, self.elapsed_s = state["history"], state["best"], state["elapsed_s"]
        restore_rng_state(state["rng"])
        if self.epoch >= self.config.train.epochs:
            log.info("resumed latent ODE run from %s after its last epoch (%d): only the final evaluation runs",
                     path, self.epoch)
        else:
            log.info("resumed latent ODE run from %s after epoch %d", path, self.epoch)
        return True

    # Training --------------------------------------------------------------------------------

    def learning_rate(self) -> float:
        """Learning rate of the current epoch: lr times lr_decay_factor per listed epoch count reached."""
        cfg = self.config.train
        return cfg.lr * cfg.lr_decay_factor ** sum(1 for e in cfg.lr_decay_epochs if self.epoch >= e)

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                method(self, *args)

    def _train_epoch(self) -> dict[str, float]:
        cfg = self.config
        self.model.train()
        train = self.splits.train
        times = train.relative_times(train.window_points)
        options = solve_options(cfg.solver, evaluation=False)
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + self.epoch)
        order = torch.randperm(len(train), generator=generator).to(self.device)
        batches = order.split(cfg.train.batch_size)
        sums = {"loss": 0.0, "neg_elbo_per_value": 0.0, "kl": 0.0, "cross_entropy": 0.0, "errors": 0.0}
        nfe_forward, nfe_backward = [], []

        for step, index in enumerate(batches):
            batch = train.subset(index)
            out = self.model(batch.observed, times, batch.labels, options)
            loss, parts = self.model.loss(out, batch.labels)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value) or loss_value > cfg.train.divergence_threshold:
                raise _Diverged(f"training loss {loss_value:g} at epoch {self.epoch + 1}, iteration {self.iteration}")

            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.train.grad_clip)
            self.optimizer.step()
            self.iteration += 1

            count = len(batch)
            sums["loss"] += loss_value * count
            for key in ("neg_elbo_per_value", "kl", "cross_entropy"):
                sums[key] += float(parts.get(key, math.nan)) * count
            sums["errors"] += float(parts.get("errors", math.nan))
            # The backward NFE is known only after loss.backward().
            nfe_forward.append(out.stats.nfe_forward)
            nfe_backward.append(out.stats.nfe_backward)
            self._emit("on_iteration", step + 1, len(batches))

        n = len(train)
        row = {f"train_{key}": value / n for key, value in sums.items() if key != "errors"}
        row["train_error"] = sums["errors"] / n
        row["train_nfe_forward"] = float(np.mean(nfe_forward))
        row["train_nfe_backward"] = float(np.mean(nfe_backward))
        return row

    def _evaluate(self, split: SpiralSet) -> dict[str, float]:
        cfg = self.config
        return evaluate_latent_ode(
            self.model, split, cfg.solver, cfg.train.eval_batch_size, cfg.data.extrapolate_points, seed=cfg.seed + 7
        )

    def fit(self, resume: bool = True) -> TrainResult:
        """Train for the configured epochs, select the epoch with the lowest validation loss, test it.

        With ``resume``, a checkpoint left in the output folder by an interrupted run of the same
        config is loaded first, and training goes on from the epoch after it. Each epoch ends by
        writing that checkpoint. Without ``resume``, the folder's checkpoints and results are
        deleted first.
        """
        cfg = self.config
        prepare_output_dir(self.output_dir, resume, LATENT_ODE_OUTPUTS)
        if resume:
            self.resume()
        # Written after the checkpoint check, so that a rejected config leaves the folder's config.toml alone.
        save_latent_ode_config(cfg, self.output_dir / "config.toml")
        log.info(
            "latent ODE run: prior %s, seed %d, solver %s with rtol=%g, atol=%g (evaluation rtol=%g, atol=%g)",
            cfg.prior.method, cfg.seed, cfg.solver.method, cfg.solver.rtol, cfg.solver.atol,
            cfg.solver.eval_rtol, cfg.solver.eval_atol,
        )
        self._emit("on_start")
        started = time.monotonic()
        base_elapsed = self.elapsed_s
        try:
            while self.epoch < cfg.train.epochs:
                row: dict[str, float] = {"epoch": self.epoch + 1, "lr": self.learning_rate()}
                row.update(self._train_epoch())
                self.epoch += 1
                if self.epoch % cfg.train.eval_every == 0 or self.epoch == cfg.train.epochs:
                    val = self._evaluate(self.splits.val)
                    row.update({f"val_{key}": value for key, value in val.items()})
                    if not self.best or val["loss"] < self.best["val_loss"]:
                        # Model selection uses the validation split only; the test set is scored once, at the end.
                        self.best = {"val_loss": val["loss"], "epoch": self.epoch,
                                     "state": copy.deepcopy(self.model.state_dict())}
                self.elapsed_s = base_elapsed + (time.monotonic() - started)
                row["elapsed_s"] = self.elapsed_s
                self.history.append(row)
                save_checkpoint(self._state(), self.checkpoint_path)
                self._write_history()
                self._emit("on_epoch_end", row)
            result = TrainResult("finished", "", self._final_metrics(), self.history)
        except SolveError as exc:
            result = self._failed(exc.status, exc.message)
        except _Diverged as exc:
            result = self._failed("diverged", f"{exc}; lower train.lr or train.grad_clip")
        except torch.cuda.OutOfMemoryError as exc:
            result = self._failed("out_of_memory", f"{exc}; lower train.batch_size or train.eval_batch_size")
        self._write_metrics(result)
        self._emit("on_end", result)
        return result

    def _failed(self, status: str, reason: str) -> TrainResult:
        log.warning("latent ODE run failed at epoch %d with status %s: %s", self.epoch + 1, status, reason)
        return TrainResult(status, reason, {"epochs_completed": float(self.epoch)}, self.history)

    def _final_metrics(self) -> dict[str, float]:
        cfg = self.config
        self.model.load_state_dict(self.best["state"])
        metrics: dict[str, float] = {"selected_epoch": float(self.best["epoch"])}
        metrics.update({f"val_{key}": value for key, value in self._evaluate(self.splits.val).items()})
        metrics.update({f"test_{key}": value for key, value in self._evaluate(self.splits.test).items()})
        metrics["test_probe_error"] = probe_direction_error(self.model, self.splits.train, self.splits.test, cfg.seed)
        metrics["train_nfe_forward"] = float(np.mean([row["train_nfe_forward"] for row in self.history]))
        metrics["train_nfe_backward"] = float(np.mean([row["train_nfe_backward"] for row in self.history]))
        metrics.update(
            rtol=cfg.solver.rtol, atol=cfg.solver.atol, eval_rtol=cfg.solver.eval_rtol, eval_atol=cfg.solver.eval_atol,
            supervised_dim=float(self.model.supervised_dim),
            num_parameters=float(sum(p.numel() for p in self.model.parameters())),
            epochs_completed=float(self.epoch),
            elapsed_s=self.elapsed_s,
        )
        torch.save({"config": cfg.to_dict(), "model": self.model.state_dict()}, self.output_dir / "model.pt")
        if cfg.train.trajectory_spirals:
            index = self.splits.test.alternating_indices(cfg.train.trajectory_spirals)
            trajectories = predict_trajectories(
                self.model, self.splits.test.subset(index), solve_options(cfg.solver, evaluation=True),
                cfg.data.extrapolate_points,
            )
            save_trajectories(trajectories, self.output_dir / "trajectories.npz")
        return metrics

    def _write_history(self) -> None:
        import pandas as pd

        pd.DataFrame(self.history).to_csv(self.output_dir / "history.csv", index=False)

    def _write_metrics(self, result: TrainResult) -> None:
        # metrics.json contains the float metrics plus the run's status, reason and config hash.
        record: dict[str, Any] = {"status": result.status, "reason": result.reason, "config_hash": self.config_hash}
        # Strict JSON: NaN (a metric that does not apply, such as the baseline prior's direction error) becomes null.
        record.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.metrics.items()})
        path = self.output_dir / "metrics.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n")
        os.replace(tmp, path)


class _Diverged(RuntimeError):
    pass


def run_latent_ode(
    config: LatentODEConfig, output_dir: str | Path, callbacks: list[Any] | None = None, resume: bool = True
) -> TrainResult:
    """Train and test one LatentODE run; writes config.toml, history.csv, metrics.json, model.pt, trajectories.npz.

    ``result.metrics`` maps names to floats (NaN where a metric does not apply), and
    ``result.history`` contains one dict per epoch. Torch runs on ``train.num_threads`` CPU threads
    for the duration of the run. With ``resume``, an interrupted run in ``output_dir`` goes on from
    its checkpoints/last.pt.
    """
    previous_threads = torch.get_num_threads()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    try:
        return LatentODETrainer(config, output_dir, callbacks).fit(resume=resume)
    finally:
        torch.set_num_threads(previous_threads)


def load_latent_ode(run_dir: str | Path) -> tuple[LatentODE, LatentODEConfig]:
    """Rebuild the selected model of a finished run from its model.pt and config.toml."""
    run_dir = Path(run_dir)
    path = run_dir / "model.pt"
    if not path.is_file():
        raise ValueError(f"model file not found: {path}; pass the output folder of a finished latent-ode run")
    config = load_latent_ode_config(run_dir / "config.toml")
    model = LatentODE(config.model, config.prior)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=False)["model"])
    return model.eval(), config
