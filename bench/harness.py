"""The harness's own cost: Trainer with MLflow logging against a minimal loop with no logging."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from infocnf.config import apply_overrides
from infocnf.train import Trainer

from .environment import synchronize
from .timing import Spread, summarize, time_iterations
from .workloads import TrainingStep, Workload

__all__ = ["HarnessCost", "PairedClock", "TimedCallback", "measure_harness"]

log = logging.getLogger(__name__)


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


class PairedClock:
    """Trainer callback that runs one minimal-loop iteration inside every on_iteration event.

    Trainer and minimal-loop iterations then alternate and meet the same load from other
    processes. A trainer iteration is timed from the end of one event to the start of the next
    within an epoch, so the first iteration of every epoch is not timed. Each timed iteration is
    paired with the minimal-loop iteration run just before it. The minimal loop draws from the global torch
    random stream too, so the trainer draws other noise and probes than it would alone.
    """

    def __init__(self, hand_step: TrainingStep, device: torch.device):
        self.hand_step = hand_step
        self.device = device
        # Per epoch: one (entry, exit) pair of (perf_counter, process_time) readings per event.
        self.stamps: list[list[tuple[tuple[float, float], tuple[float, float]]]] = []
        self.hand_nfe: list[int] = []

    def on_iteration(self, trainer, iteration: int, iterations_per_epoch: int) -> None:
        # The trainer already synchronises on its loss each iteration. This makes sure of it on a GPU.
        synchronize(self.device)
        entry = _now()
        if iteration == 1:
            self.stamps.append([])
        if iteration < iterations_per_epoch:
            # None after the last trainer iteration of an epoch, because no timed iteration follows it.
            nfe_forward, nfe_backward = self.hand_step()
            synchronize(self.device)
            self.hand_nfe.append(nfe_forward + nfe_backward)
        self.stamps[-1].append((entry, _now()))

    def trainer_times(self, cpu: bool = False) -> list[float]:
        """Seconds of each timed trainer iteration: from one event's exit to the next event's entry."""
        k = 1 if cpu else 0
        return [b[0][k] - a[1][k] for epoch in self.stamps for a, b in zip(epoch[:-1], epoch[1:])]

    def hand_times(self, cpu: bool = False) -> list[float]:
        """Seconds of each minimal-loop iteration, in the order of the trainer iterations they precede."""
        k = 1 if cpu else 0
        return [a[1][k] - a[0][k] for epoch in self.stamps for a in epoch[:-1]]


class TimedCallback:
    """Wrap a trainer callback and add up the wall-clock seconds spent in each of its events."""

    _EVENTS = ("on_start", "on_iteration", "on_epoch_end", "on_end")

    def __init__(self, inner):
        self.inner = inner
        self.seconds = {name: 0.0 for name in self._EVENTS}
        self.calls = {name: 0 for name in self._EVENTS}
        for name in self._EVENTS:
            method = getattr(inner, name, None)
            if method is not None:
                setattr(self, name, self._timed(name, method))

    def _timed(self, name, method):
        def call(*args):
            started = time.perf_counter()
            try:
                return method(*args)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1

        return call

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


@dataclass
class HarnessCost:
    """Trainer iterations against hand-loop iterations, and the MLflow callback's share of the run."""

    batch_size: int
    tolerance: float
    epochs: int
    iterations_per_epoch: int
    hand_loop_s: Spread
    hand_loop_cpu_s: Spread
    hand_loop_nfe: Spread
    trainer_s: Spread
    trainer_cpu_s: Spread
    # Forward plus backward NFE per iteration, averaged over the trainer's epochs.
    trainer_nfe_mean: float
    # Wall-clock seconds of Trainer.fit without the minimal-loop iterations run inside it.
    trainer_fit_s: float
    # Trainer iteration minus the minimal-loop iteration run just before it, and the median of
    # these differences over the trainer's median, both in CPU seconds on the CPU (steadier on a
    # shared machine) and in wall-clock seconds on a GPU.
    paired_difference_s: Spread
    trainer_overhead_share: float
    mlflow: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def _mlflow_callback(uri: str) -> tuple[object, dict]:
    # Imported here: MLflow takes seconds to import, and the rest of the benchmark needs none of it.
    from infocnf.tracking import MlflowCallback, open_tracking

    started = time.perf_counter()
    client, uri, experiment_id = open_tracking(uri, "bench-harness")
    opened = time.perf_counter()
    run_id = client.create_run(experiment_id, run_name="bench-harness").info.run_id
    created = time.perf_counter()
    setup = {"uri": uri, "open_store_s": opened - started, "create_run_s": created - opened}
    return TimedCallback(MlflowCallback(client, run_id)), setup


def measure_harness(
    workload: Workload,
    batch_size: int,
    tolerance: float,
    epochs: int,
    iterations_per_epoch: int,
    device: torch.device,
    mlflow: bool = True,
    workdir: str | Path | None = None,
) -> HarnessCost:
    """Time the same training steps through Trainer.fit and through TrainingStep, in alternation.

    Trainer.fit runs ``epochs`` epochs of ``iterations_per_epoch`` iterations with checkpoints
    every epoch and one evaluation at the end (no extra evaluation tolerances), logging to a new
    SQLite MLflow store under ``workdir`` when ``mlflow``. A PairedClock runs one minimal-loop
    iteration before each timed trainer iteration. Its time is left out of Trainer.fit's wall
    time wherever that is reported or divided by.
    """
    if epochs < 1 or iterations_per_epoch < 2:
        raise ValueError(
            f"invalid harness size: {epochs} epochs of {iterations_per_epoch} iterations; "
            f"expected epochs >= 1 and iterations per epoch >= 2"
        )
    hand = TrainingStep(workload, batch_size, tolerance, device)
    time_iterations(hand, device, warmup=1, repeats=1)

    config = apply_overrides(
        workload.config,
        {
            "train.batch_size": batch_size,
            "train.epochs": epochs,
            "train.eval_every": epochs,
            "train.device": str(device),
            "solver.tolerance.strategy": "fixed",
            "solver.tolerance.value": tolerance,
            "solver.extra_eval_tolerances": [],
            "data.max_examples": batch_size * iterations_per_epoch,
        },
    )
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        clock = PairedClock(hand, device)
        callbacks: list = [clock]
        setup: dict = {}
        timed = None
        if mlflow:
            timed, setup = _mlflow_callback(f"sqlite:///{Path(tmp) / 'mlflow.db'}")
            callbacks.insert(0, timed)
        trainer = Trainer(config, Path(tmp) / "run", callbacks)
        started = time.perf_counter()
        result = trainer.fit(resume=False)
        fit_s = time.perf_counter() - started - sum(clock.hand_times())
    if result.status != "finished":
        raise RuntimeError(f"the harness run ended with status {result.status}: {result.reason}")

    # CPU seconds on the CPU, where other processes inflate wall-clock time; wall-clock on a GPU.
    cpu = device.type == "cpu"
    trainer_times, hand_times = clock.trainer_times(cpu), clock.hand_times(cpu)
    differences = [t - h for t, h in zip(trainer_times, hand_times)]
    nfe_rows = [row["train_nfe_forward"] + row["train_nfe_backward"] for row in result.history]
    mlflow_info: dict = {}
    if timed is not None:
        mlflow_info = {
            **setup,
            "event_s": dict(timed.seconds),
            "event_calls": dict(timed.calls),
            "total_s": timed.total_s,
            # Logging time over the wall time of the Trainer.fit that did the logging.
            "share_of_fit": timed.total_s / fit_s,
        }
    return HarnessCost(
        batch_size=batch_size,
        tolerance=tolerance,
        epochs=epochs,
        iterations_per_epoch=iterations_per_epoch,
        hand_loop_s=summarize(clock.hand_times()),
        hand_loop_cpu_s=summarize(clock.hand_times(cpu=True)),
        hand_loop_nfe=summarize(clock.hand_nfe),
        trainer_s=summarize(clock.trainer_times()),
        trainer_cpu_s=summarize(clock.trainer_times(cpu=True)),
        trainer_nfe_mean=sum(nfe_rows) / len(nfe_rows),
        trainer_fit_s=fit_s,
        paired_difference_s=summarize(differences),
        trainer_overhead_share=summarize(differences).median / summarize(trainer_times).median,
        mlflow=mlflow_info,
    )
