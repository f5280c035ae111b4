"""Optuna search for per-scale training tolerances, the source of the "manual" tolerance lists.

Each trial trains the run config for a short budget with ``solver.tolerance.strategy =
"manual"``. It samples one log10 tolerance per scale of the multiscale flow (shared by every CNF
block of that scale) or per block of the flat MLP flow. Its model is scored on the validation
split at the fixed evaluation tolerance.

The study is multi-objective: it minimises (validation bits/dim, mean forward NFE per training
iteration) and keeps the Pareto front. A constrained single objective would need the accepted
bits/dim loss fixed before the study, relative to a best value that is unknown until trials
have run. The front serves any such threshold afterwards: the selection rule below runs on the
stored trials, so rerunning with the same trial count and another ``bpd_slack`` re-picks
without training. Validation error is recorded as a user attribute and reported, not
optimised, because on a short budget it is noisy and unconditional models have none.

Selection rule: among Pareto-optimal trials, take those whose validation bits/dim is at most
``best + bpd_slack * |best|`` and choose the one with the lowest mean forward NFE (ties go to
the lower bits/dim). The chosen tolerances are written as a TOML snippet.

The sampler is TPE, Optuna's default (in 5.1) for one or several objectives. It samples its first
10 trials at random and then models the front, whereas NSGA-II samples a whole first generation
(50 trials by default) at random, longer than a search of tens of trials. Trials that end with a solver failure or divergence are stored as PRUNED with the
status and reason as user attributes, and count towards the requested number of trials.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import tomli_w
from optuna.trial import FrozenTrial, TrialState

from .config import ModelConfig, RunConfig, apply_overrides, config_hash, save_config
from .data import load_splits
from .train import Trainer

__all__ = ["TuneConfig", "TuneResult", "ToleranceGroup", "tolerance_groups", "choose_trial", "trials_frame", "tune_tolerance"]

log = logging.getLogger(__name__)

# Trials in these states count towards the requested total: each one measured a tolerance
# setting, failed or not. FAIL trials (interrupts, program errors) are retried by a rerun.
_FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
_STUDY_KEYS = ("base_config_hash", "log10_min", "log10_max", "groups")


@dataclass(frozen=True)
class TuneConfig:
    """Settings of one tolerance search, validated on construction."""

    # Trials the study should contain in total (finished or pruned), counting earlier sessions.
    trials: int
    # Sampled log10 tolerance range. The default reaches two decades tighter and three looser
    # than 1e-5, a common fixed training tolerance for CNFs.
    log10_min: float = -7.0
    log10_max: float = -2.0
    # Training epochs per trial. None means a tenth of the config's train.epochs, at least 1.
    epochs: int | None = None
    # Relative bits/dim slack of the selection rule: 0.01 accepts trials within 1 % of the best.
    bpd_slack: float = 0.01
    study_name: str = "tune-tolerance"
    # Optuna storage URL. Empty means sqlite:///<output>/study.db.
    storage: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"invalid trials = {self.trials!r}: expected an integer >= 1, the total the study should contain")
        for name in ("log10_min", "log10_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value >= 0:
                raise ValueError(f"invalid {name} = {value!r}: expected a finite log10 tolerance below 0, for example -5")
        if self.log10_min >= self.log10_max:
            raise ValueError(
                f"invalid tolerance range: log10_min = {self.log10_min} is not below log10_max = {self.log10_max}; "
                "give the tighter (more negative) bound as log10_min"
            )
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"invalid epochs = {self.epochs!r}: expected an integer >= 1 (training epochs per trial)")
        if not math.isfinite(self.bpd_slack) or self.bpd_slack < 0:
            raise ValueError(f"invalid bpd_slack = {self.bpd_slack!r}: expected a fraction >= 0, for example 0.01 for 1 %")
        if not self.study_name.strip():
            raise ValueError("invalid study_name = '': expected a non-empty name")
        if self.storage and "://" not in self.storage:
            raise ValueError(
                f"invalid storage = {self.storage!r}: expected a database URL such as sqlite:///study.db"
            )


@dataclass(frozen=True)
class ToleranceGroup:
    """CNF blocks (indices in flow order) that share one sampled tolerance."""

    name: str
    blocks: tuple[int, ...]


@dataclass
class TuneResult:
    """Outcome of a search: the chosen trial (None when no trial finished) and the files written."""

    study_name: str
    storage: str
    trials_finished: int
    trials_run: int
    chosen_trial: int | None = None
    per_block: tuple[float, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def tolerance_groups(model: ModelConfig) -> list[ToleranceGroup]:
    """Group the flow's CNF blocks by scale (multiscale flow) or one per block (MLP flow)."""
    if model.architecture == "mlp":
        return [ToleranceGroup(f"block_{i}", (i,)) for i in range(model.num_blocks)]
    # The multiscale flow runs num_blocks blocks before and num_blocks after each squeeze, and
    # only num_blocks at its last scale.
    groups, start = [], 0
    for scale in range(model.num_scales):
        count = model.num_blocks if scale == model.num_scales - 1 else 2 * model.num_blocks
        groups.append(ToleranceGroup(f"scale_{scale}", tuple(range(start, start + count))))
        start += count
    return groups


def _per_block(groups: list[ToleranceGroup], log10_tolerances: list[float]) -> list[float]:
    # Three significant digits, so the snippet contains exactly the tolerances that were trained.
    per_block = [0.0] * sum(len(g.blocks) for g in groups)
    for group, log10_tol in zip(groups, log10_tolerances):
        for block in group.blocks:
            per_block[block] = float(f"{10.0**log10_tol:.3g}")
    return per_block


def _trial_base(config: RunConfig, epochs: int) -> RunConfig:
    # Evaluate once, after the last epoch, and skip the extra tight-tolerance test evaluations:
    # a trial is scored on validation at the evaluation tolerance only.
    return apply_overrides(
        config,
        {
            "train.epochs": epochs,
            "train.eval_every": epochs,
            "train.checkpoint_every": epochs,
            "solver.extra_eval_tolerances": [],
            "solver.tolerance": {},
        },
    )


def _manual(config: RunConfig, per_block: list[float]) -> RunConfig:
    return apply_overrides(config, {"solver.tolerance": {"strategy": "manual", "per_block": per_block}})


def _open_study(tune: TuneConfig, storage_url: str, identity: dict[str, Any]) -> optuna.Study:
    # The heartbeat lets a later session mark trials of a killed process as FAIL. Optuna 5.1
    # still flags heartbeat_interval as experimental, and that warning is not actionable here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(storage_url, heartbeat_interval=60, grace_period=180)
    study = optuna.create_study(
        study_name=tune.study_name,
        storage=storage,
        directions=["minimize", "minimize"],
        load_if_exists=True,
    )
    if not study.user_attrs:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        return study
    stored = {key: study.user_attrs.get(key) for key in _STUDY_KEYS}
    changed = [key for key in _STUDY_KEYS if stored[key] != identity[key]]
    if changed:
        raise ValueError(
            f"study {tune.study_name!r} in {storage_url} was created with other settings ({', '.join(changed)}: "
            f"{[stored[k] for k in changed]} there, {[identity[k] for k in changed]} now); its trials are not "
            "comparable with new ones, so pass another --study-name or --output, or restore those settings"
        )
    return study


def tune_tolerance(
    config: RunConfig,
    output_dir: str | Path,
    tune: TuneConfig,
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] | None = None,
    trainer_callbacks: Callable[[], list[Any]] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> TuneResult:
    """Run (or resume) the search until the study contains ``tune.trials`` finished trials, then summarise it.

    Writes to ``output_dir``: tolerance.toml (the snippet), best_config.toml (``config`` with the
    chosen tolerances), trials.csv, trials.md, pareto.png, and one training folder per trial under
    trials/<study name>/. ``callbacks`` are Optuna trial callbacks, ``trainer_callbacks`` builds
    the Trainer callbacks of each trial, and ``on_start(finished, remaining)`` is called once the
    stored trials are counted, before the first new trial.
    """
    if not config.solver.adaptive:
        raise ValueError(
            f"invalid solver.method = {config.solver.method!r} for a tolerance search: fixed-grid methods ignore "
            "atol and rtol; choose an adaptive method such as dopri5"
        )
    output_dir = Path(output_dir)
    epochs = tune.epochs or max(1, round(config.train.epochs / 10))
    base = _trial_base(config, epochs)
    groups = tolerance_groups(config.model)
    identity = {
        "base_config_hash": config_hash(base),
        "log10_min": tune.log10_min,
        "log10_max": tune.log10_max,
        "groups": [[g.name, list(g.blocks)] for g in groups],
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    storage_url = tune.storage or f"sqlite:///{(output_dir / 'study.db').resolve()}"
    study = _open_study(tune, storage_url, identity)
    finished = len(study.get_trials(deepcopy=False, states=_FINISHED_STATES))
    remaining = max(0, tune.trials - finished)
    # Seeded by the trials already stored, so a resumed session does not repeat the first
    # session's random start-up points.
    # NOTE: workers started at the same time on one shared storage get the same seed, so their
    # first points can coincide.
    study.sampler = optuna.samplers.TPESampler(seed=config.seed + len(study.trials))
    log.info("study %r in %s: %d finished trials, running %d more", tune.study_name, storage_url, finished, remaining)
    if on_start is not None:
        on_start(finished, remaining)

    if remaining:
        splits = load_splits(base.data)
        runs_dir = output_dir / "trials" / re.sub(r"[^A-Za-z0-9_.-]", "_", tune.study_name)

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            log10_tols = [trial.suggest_float(f"log10_tol_{g.name}", tune.log10_min, tune.log10_max) for g in groups]
            per_block = _per_block(groups, log10_tols)
            run_dir = runs_dir / f"trial_{trial.number:04d}"
            trial.set_user_attr("per_block", per_block)
            trial.set_user_attr("output_dir", str(run_dir))
            extra = trainer_callbacks() if trainer_callbacks else []
            result = Trainer(_manual(base, per_block), run_dir, extra, splits=splits).fit(resume=False)
            trial.set_user_attr("status", result.status)
            if result.status != "finished":
                trial.set_user_attr("reason", result.reason)
                raise optuna.TrialPruned(f"training ended with status {result.status}: {result.reason}")
            metrics = result.metrics
            bpd, nfe = float(metrics["val_bits_per_dim"]), float(metrics["train_nfe_forward"])
            error = float(metrics["val_error"])
            trial.set_user_attr("val_error", error if math.isfinite(error) else None)
            trial.set_user_attr("elapsed_s", float(metrics["elapsed_s"]))
            if not (math.isfinite(bpd) and math.isfinite(nfe)):
                trial.set_user_attr("status", "non_finite")
                trial.set_user_attr("reason", f"validation bits/dim {bpd} or forward NFE {nfe} is not finite")
                raise optuna.TrialPruned(f"non-finite result: bits/dim {bpd}, NFE {nfe}")
            return bpd, nfe

        limit = optuna.study.MaxTrialsCallback(tune.trials, states=_FINISHED_STATES)
        study.optimize(objective, n_trials=remaining, callbacks=[limit, *(callbacks or [])])

    result = TuneResult(
        study_name=tune.study_name,
        storage=storage_url,
        trials_finished=len(study.get_trials(deepcopy=False, states=_FINISHED_STATES)),
        trials_run=remaining,
    )
    _write_summary(study, config, groups, epochs, tune, output_dir, result)
    return result


def trials_frame(study: optuna.Study, groups: list[ToleranceGroup]) -> pd.DataFrame:
    """Build a table with one row per trial: sampled log10 tolerances, per-block tolerances, metrics, Pareto flag, failure reason."""
    front = {t.number for t in study.best_trials}
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        values = trial.values if trial.state == TrialState.COMPLETE else [math.nan, math.nan]
        row: dict[str, Any] = {"trial": trial.number, "state": trial.state.name}
        for group in groups:
            row[f"log10_tol_{group.name}"] = trial.params.get(f"log10_tol_{group.name}", math.nan)
        row["per_block"] = " ".join(f"{tol:g}" for tol in attrs.get("per_block", []))
        row["val_bits_per_dim"] = values[0]
        row["val_error"] = attrs.get("val_error") if attrs.get("val_error") is not None else math.nan
        row["train_nfe_forward"] = values[1]
        row["pareto"] = trial.number in front
        row["status"] = attrs.get("status", "")
        row["reason"] = attrs.get("reason", "")
        if trial.state == TrialState.FAIL and not row["reason"]:
            row["reason"] = "the trial raised an exception or was interrupted (see the log); a rerun retries it"
        row["elapsed_s"] = attrs.get("elapsed_s", math.nan)
        rows.append(row)
    columns = ["trial", "state", *(f"log10_tol_{g.name}" for g in groups), "per_block", "val_bits_per_dim",
               "val_error", "train_nfe_forward", "pareto", "status", "reason", "elapsed_s"]
    return pd.DataFrame(rows, columns=columns)


def choose_trial(frame: pd.DataFrame, bpd_slack: float) -> int | None:
    """Return the trial number the selection rule picks from a trials_frame, or None when no trial is on the front."""
    front = frame[frame["pareto"].astype(bool)]
    if front.empty:
        return None
    best = front["val_bits_per_dim"].min()
    accepted = front[front["val_bits_per_dim"] <= best + bpd_slack * abs(best)]
    chosen = accepted.sort_values(["train_nfe_forward", "val_bits_per_dim"]).iloc[0]
    return int(chosen["trial"])


def _write_summary(
    study: optuna.Study,
    config: RunConfig,
    groups: list[ToleranceGroup],
    epochs: int,
    tune: TuneConfig,
    output_dir: Path,
    result: TuneResult,
) -> None:
    frame = trials_frame(study, groups)
    chosen = choose_trial(frame, tune.bpd_slack)
    frame["chosen"] = frame["trial"] == chosen
    files = {"trials_csv": output_dir / "trials.csv", "trials_md": output_dir / "trials.md", "pareto_png": output_dir / "pareto.png"}
    frame.to_csv(files["trials_csv"], index=False)

    rule = (
        f"lowest mean forward NFE per training iteration among Pareto-optimal trials whose validation "
        f"bits/dim is within {100 * tune.bpd_slack:g} % of the best"
    )
    lines = [
        f"# Tolerance search {tune.study_name!r}",
        "",
        f"{result.trials_finished} finished trials ({int((frame['state'] == 'PRUNED').sum())} pruned after a failed "
        f"run), {epochs} training epoch{'s' if epochs != 1 else ''} each, log10 tolerance sampled in "
        f"[{tune.log10_min:g}, {tune.log10_max:g}] per {'scale' if config.model.architecture == 'multiscale' else 'block'}; "
        f"validation metrics at the evaluation tolerance {config.solver.eval_tolerance:g}.",
        "",
        f"Selection rule: {rule}.",
        "",
    ]
    if chosen is not None:
        row = frame[frame["trial"] == chosen].iloc[0]
        per_block = tuple(next(t for t in study.trials if t.number == chosen).user_attrs["per_block"])
        result.chosen_trial, result.per_block = chosen, per_block
        result.metrics = {key: float(row[key]) for key in ("val_bits_per_dim", "val_error", "train_nfe_forward")}
        snippet = tomli_w.dumps({"solver": {"tolerance": {"strategy": "manual", "per_block": list(per_block)}}})
        header = (
            f"# Chosen by infocnf tune-tolerance, study {tune.study_name!r}, trial {chosen}: {rule}.\n"
            f"# Validation bits/dim {row['val_bits_per_dim']:.4f}, mean forward NFE {row['train_nfe_forward']:.1f} "
            f"after {epochs} training epoch{'s' if epochs != 1 else ''}.\n"
        )
        files["snippet"] = output_dir / "tolerance.toml"
        files["snippet"].write_text(header + snippet)
        files["best_config"] = output_dir / "best_config.toml"
        save_config(_manual(config, list(per_block)), files["best_config"])
        lines += [f"Chosen: trial {chosen}, per_block = {list(per_block)}.", ""]
    else:
        lines += ["Chosen: none, because no trial finished; the reason column says why each one failed.", ""]
    # Six significant digits: on a short budget the bits/dim of different trials can differ
    # only in the fifth.
    lines.append(frame.to_markdown(index=False, floatfmt=".6g"))
    files["trials_md"].write_text("\n".join(lines) + "\n")
    _plot_front(frame, tune.study_name, files["pareto_png"])
    result.files = files


def _plot_front(frame: pd.DataFrame, study_name: str, path: Path) -> None:
    # The object-oriented Figure API draws without pyplot, so no GUI backend is selected.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axes = figure.add_subplot()
    done = frame[frame["state"] == "COMPLETE"]
    if not done.empty:
        axes.scatter(done["train_nfe_forward"], done["val_bits_per_dim"], color="0.6", label="trial")
        front = done[done["pareto"]].sort_values("train_nfe_forward")
        axes.step(front["train_nfe_forward"], front["val_bits_per_dim"], where="post", color="C0")
        axes.scatter(front["train_nfe_forward"], front["val_bits_per_dim"], color="C0", label="Pareto front")
        chosen = done[done["chosen"]]
        if not chosen.empty:
            axes.scatter(chosen["train_nfe_forward"], chosen["val_bits_per_dim"], marker="*", s=250,
                         color="C3", label=f"chosen (trial {int(chosen['trial'].iloc[0])})", zorder=3)
        axes.legend()
    incomplete = int((frame["state"] != "COMPLETE").sum())
    axes.set_xlabel("mean forward NFE per training iteration")
    axes.set_ylabel("validation bits/dim")
    axes.ticklabel_format(axis="y", useOffset=False)
    axes.set_title(f"{study_name}: {len(done)} completed trials, {incomplete} pruned or failed")
    figure.savefig(path, dpi=120)
