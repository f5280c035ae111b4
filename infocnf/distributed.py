"""Data-parallel training of one run under torchrun: process group, batch shards, DDP and reductions.

Every rank loads the whole dataset and walks the same global batches, because every rank seeds
the same way. Rank r trains on rows [r * b, (r + 1) * b) of each global batch of B = b * world
size examples, and DistributedDataParallel averages the gradients, so one step equals one
process's step on the whole batch, except that each rank's adaptive solver picks its own steps
for its rows. Only rank 0 reads and writes files and fires callbacks (MLflow logs once).
No collective runs inside an ODE solve: ranks agree after each forward pass, after each
epoch and after each evaluation, so ranks that take different step counts never wait on each
other mid-solve.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoints import load_checkpoint
from .data import Split
from .evaluate import evaluate
from .solve import SOLVE_STATUSES, SolveError

__all__ = ["DataParallel", "join_process_group", "launched_by_torchrun", "run_grid_data_parallel"]

log = logging.getLogger(__name__)

# Failures a rank reports to the others after a forward pass, in a fixed order for the all-reduce.
_FAILURES = tuple(s for s in SOLVE_STATUSES if s != "ok") + ("out_of_memory",)
# Epoch-row metrics that are means over examples; the other metrics are means over ranks.
_EXAMPLE_MEANS = ("train_loss", "train_bits_per_dim", "train_cross_entropy", "train_error")


def launched_by_torchrun() -> bool:
    """Return whether this process is one of several that torchrun started (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join_process_group(device: str) -> DataParallel | None:
    """Join the process group torchrun describes in the environment; None for a single process.

    torchrun sets RANK, WORLD_SIZE and LOCAL_RANK. ``device`` is train.device: "auto" and "cuda"
    put rank r on GPU LOCAL_RANK with the NCCL backend when CUDA is available, and "cpu" (or no
    GPU with "auto") runs every rank on the CPU with gloo.
    """
    if not launched_by_torchrun():
        return None
    if "RANK" not in os.environ:
        raise ValueError("WORLD_SIZE is set but RANK is not: start data-parallel training with torchrun")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda:"):
        raise ValueError(
            f"invalid train.device = {device!r} under torchrun: rank r uses GPU LOCAL_RANK, so set auto or cuda"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"invalid train.device = {device!r}: no CUDA device is available; use auto or cpu")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) gives the rendezvous.
        dist.init_process_group("nccl" if use_cuda else "gloo")
        atexit.register(_leave_process_group)
        log.info("rank %d of %d joined the %s process group", rank, world_size, dist.get_backend())
    return DataParallel(rank, world_size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class _Step(nn.Module):
    """The model and its tolerance policy as one module, so that DDP averages the gradients of both."""

    def __init__(self, model: nn.Module, policy: nn.Module):
        super().__init__()
        self.model = model
        self.policy = policy

    def forward(self, x: torch.Tensor, labels: torch.Tensor, plan):
        return self.model(x, labels, plan)


class DataParallel:
    """This process's rank in a data-parallel run, with the collectives the trainer needs."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self._ddp: DistributedDataParallel | None = None
        self._seed = 0

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the only rank that writes files and fires callbacks."""
        return self.rank == 0

    def wrap(self, model: nn.Module, policy: nn.Module, batch_size: int, seed: int) -> None:
        """Wrap the model and policy in DDP for global batches of ``batch_size`` examples."""
        if batch_size % self.world_size:
            raise ValueError(
                f"invalid train.batch_size = {batch_size} for {self.world_size} ranks: the global batch is split "
                f"evenly across ranks; use a multiple of {self.world_size}"
            )
        self._seed = seed
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(_Step(model, policy), device_ids=device_ids)

    def shard(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of a global batch: (batch, ...) -> (batch / world_size, ...)."""
        size = labels.shape[0] // self.world_size
        rows = slice(self.rank * size, (self.rank + 1) * size)
        return x[rows], labels[rows]

    def forward(self, x: torch.Tensor, labels: torch.Tensor, plan, iteration: int):
        """Score this rank's rows through DDP; returns (out, loss, parts, global mean loss).

        ``out``, ``loss`` and ``parts`` are this rank's; the last value is the mean loss over the
        global batch, the same on every rank. Random draws of the forward pass (Hutchinson probes,
        dropout, sampled tolerances) come from a generator seeded by (seed, iteration, rank). So
        the ranks draw independent values, their main RNG streams stay equal, and a resumed run
        draws what an uninterrupted one would. A SolveError or out-of-memory error on any rank
        raises SolveError on every rank, so no rank waits in a collective for one that left.
        """
        out = loss = parts = None
        failure: tuple[str, str] | None = None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((self._seed * 1_000_003 + iteration) * self.world_size + self.rank)
            try:
                out = self._ddp(x, labels, plan)
                loss, parts = self._ddp.module.model.loss(out, labels)
            except SolveError as exc:
                failure = (exc.status, exc.message)
            except torch.cuda.OutOfMemoryError as exc:
                failure = ("out_of_memory", f"{exc}; lower train.batch_size or set solver.adjoint = true")
        count = labels.shape[0]
        local = [0.0 if failure else float(loss.detach()) * count, float(count)]
        local += [float(failure is not None and failure[0] == status) for status in _FAILURES]
        totals = self._sum(local)
        if any(totals[2:]):
            failures = self._gather(failure)
            failed_ranks = [rank for rank, failed in enumerate(failures) if failed is not None]
            status, message = failures[failed_ranks[0]]
            where = "rank" if len(failed_ranks) == 1 else "ranks"
            where += " " + ", ".join(str(rank) for rank in failed_ranks)
            raise SolveError(status, f"on {where} of {self.world_size}: {message}")
        return out, loss, parts, totals[0] / totals[1]

    def reduce_train_row(self, row: dict[str, float], examples: float) -> dict[str, float]:
        """Merge the ranks' training rows of one epoch; every rank gets the same merged row.

        Losses and errors become means over all examples, NFE and tolerance statistics means
        over ranks, and each rank's own forward and backward NFE are kept as
        ``train_nfe_forward_rank_<r>`` and ``train_nfe_backward_rank_<r>``.
        """
        rows = self._gather((row, examples))
        total = sum(n for _, n in rows)
        merged = {}
        for key in row:
            if key in _EXAMPLE_MEANS:
                merged[key] = sum(r[key] * n for r, n in rows) / total
            else:
                # NOTE: a mean over ranks of per-rank quantiles (train_log10_tol_*_q10) is not the
                # quantile of all draws; it is close when ranks draw alike.
                merged[key] = float(np.mean([r[key] for r, _ in rows]))
        for rank, (r, _) in enumerate(rows):
            merged[f"train_nfe_forward_rank_{rank}"] = r["train_nfe_forward"]
            merged[f"train_nfe_backward_rank_{rank}"] = r["train_nfe_backward"]
        return merged

    def evaluate(
        self,
        model: nn.Module,
        split: Split,
        make_plan: Callable[[], Any],
        batch_size: int,
        seed: int,
        observer: Callable[[int, torch.Tensor], None] | None = None,
    ) -> dict[str, float]:
        """``evaluate`` over the ranks: each scores a contiguous part of ``split``, then one merge.

        Part sizes differ by at most one example, and rank r draws its noise with seed + r.
        The only collective follows the last batch, so ranks whose solves take different step
        counts never wait for each other mid-solve. A SolveError on one rank is raised on all.
        Means over examples are weighted by examples, NFE by batches, and tolerances take the
        min and max. ``observer`` sees only this rank's part.
        """
        n = len(split)
        if n < self.world_size:
            raise ValueError(f"cannot split {n} evaluation examples across {self.world_size} ranks; use fewer ranks")
        start, stop = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        part = Split(split.images[start:stop], split.labels[start:stop])
        result, failure = None, None
        try:
            result = evaluate(model, part, make_plan, batch_size, seed=seed + self.rank, observer=observer)
        except SolveError as exc:
            failure = (exc.status, exc.message)
        gathered = self._gather((result, failure, stop - start, math.ceil((stop - start) / batch_size)))
        for rank, (_, failed, _, _) in enumerate(gathered):
            if failed is not None:
                raise SolveError(failed[0], f"evaluating on rank {rank} of {self.world_size}: {failed[1]}")
        examples = sum(g[2] for g in gathered)
        batches = sum(g[3] for g in gathered)
        merged = {}
        for key in result:
            values = [g[0][key] for g in gathered]
            if key == "tolerance_min":
                merged[key] = min(values)
            elif key == "tolerance_max":
                merged[key] = max(values)
            elif key.startswith("nfe"):
                merged[key] = sum(g[0][key] * g[3] for g in gathered) / batches
            else:
                merged[key] = sum(g[0][key] * g[2] for g in gathered) / examples
        return merged

    def load(self, path: Path) -> dict[str, Any] | None:
        """Read a checkpoint on rank 0 and send it to every rank; None where the file does not exist.

        Only rank 0 reads, so ranks on other machines need no shared folder. Tensors arrive on
        the CPU, and load_state_dict copies them to each rank's device.
        """
        state = None
        if self.is_main:
            state = load_checkpoint(path)
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
        cuda_states = (state or {}).get("rng", {}).get("cuda")
        if cuda_states and self.device.type == "cuda" and self.device.index < len(cuda_states):
            # Rank 0 saved its process's generator of every GPU, and its own is GPU 0. Every rank
            # draws the global batch's noise on its own GPU, so that GPU resumes from GPU 0's state.
            # NOTE: not run yet, because the test machines have no GPU.
            cuda_states[self.device.index] = cuda_states[0]
        return state

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank, for decisions that must agree (the run's elapsed time)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def _gather(self, value: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


class _AnnouncingClaimer:
    """Rank 0's claimer under torchrun: claims as ``inner`` does and sends each run to train to the other ranks."""

    def __init__(self, inner, data_parallel: DataParallel):
        self.inner = inner
        self.data_parallel = data_parallel
        self._releaser = inner

    def claims(self, grid, runs):
        self._releaser = self.inner or runs
        try:
            with closing(self._releaser.claims(grid, runs)) as claims:
                for cell, seed, claim in claims:
                    if claim.action != "skip":
                        self.data_parallel.from_main((cell.cell_id, seed))
                    yield cell, seed, claim
        finally:
            self.data_parallel.from_main(None)  # No more runs: the other ranks return.

    def release(self, cell, seed, outcome: str) -> None:
        self._releaser.release(cell, seed, outcome)


def run_grid_data_parallel(grid, claimer=None, **run_grid_args):
    """Run a grid under torchrun with every run trained data-parallel over all ranks.

    Rank 0 claims runs as ``run_grid`` does (with ``claimer``, for example an OptunaClaimer),
    logs them to MLflow and returns the GridSummary. The other ranks train each run that rank 0
    sends them, and return None. Each run's checkpoints live in rank 0's run folder.
    NOTE: a failure on rank 0 outside a training step (the tracking server going away) leaves
    the other ranks waiting until torchrun stops the group, because they cannot tell.
    """
    from .runner import run_grid
    from .train import Trainer

    if grid.kind != "cnf":
        raise ValueError(f"grid kind {grid.kind!r} cannot train data-parallel under torchrun; run it without torchrun")
    data_parallel = join_process_group(next(iter(grid.cells[0].configs.values())).train.device)
    if data_parallel is None:
        return run_grid(grid, claimer=claimer, **run_grid_args)
    if data_parallel.is_main:
        return run_grid(grid, claimer=_AnnouncingClaimer(claimer, data_parallel), **run_grid_args)
    cells = {cell.cell_id: cell for cell in grid.cells}
    while (assignment := data_parallel.from_main(None)) is not None:
        cell_id, seed = assignment
        # Rank 0 writes every file, so this rank's output folder stays unused.
        unused = Path(run_grid_args.get("runs_dir", "runs"))
        try:
            Trainer(cells[cell_id].configs[seed], unused).fit(resume=True)
        except Exception as exc:  # Rank 0 records the failure of the run; this rank goes on to the next.
            log.error("rank %d: %s seed %d failed: %s: %s", data_parallel.rank, cell_id, seed, type(exc).__name__, exc)
    return None
