"""tqdm progress bars as trainer callbacks, and log output kept above them, for the command line only."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["EpochProgress", "logging_above_bars"]


@contextmanager
def logging_above_bars() -> Iterator[None]:
    """Route the root logger's console handler through ``tqdm.write`` while the block runs.

    tqdm.write clears the open progress bars, prints the line and redraws the bars below it, so
    lines that reach the root logger do not land inside a bar. Without open bars it prints the line
    as the console handler would. A root logger without a stdout or stderr handler is left alone,
    because tqdm's redirect would then add a stderr handler of its own.
    """
    # NOTE: loggers that do not propagate to the root keep their own handlers, so their lines can
    # still break a bar. MLflow 3.17 configures its "mlflow" logger that way on import.
    root = logging.getLogger()
    has_console = any(
        isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)
        for handler in root.handlers
    )
    if not has_console:
        yield
        return
    with logging_redirect_tqdm([root]):
        yield


class EpochProgress:
    """Shows one bar over epochs and one over the iterations of the current epoch, with ETA."""

    def __init__(self, position: int = 0, leave: bool = True):
        self.position = position
        self.leave = leave
        self.epochs = None
        self.iterations = None

    def on_start(self, trainer) -> None:
        total = trainer.config.train.epochs
        self.epochs = tqdm(total=total, initial=trainer.epoch, desc="epochs", unit="epoch",
                           position=self.position, leave=self.leave, dynamic_ncols=True)

    def on_iteration(self, trainer, iteration: int, per_epoch: int) -> None:
        if self.iterations is None:
            self.iterations = tqdm(total=per_epoch, desc=f"epoch {trainer.epoch + 1}", unit="it",
                                   position=self.position + 1, leave=False, dynamic_ncols=True)
        self.iterations.update(1)

    def on_epoch_end(self, trainer, row: dict) -> None:
        if self.iterations is not None:
            self.iterations.close()
            self.iterations = None
        postfix = {"loss": f"{row['train_loss']:.3f}", "nfe": f"{row['train_nfe_forward']:.0f}"}
        if "val_bits_per_dim" in row:
            postfix["val_bpd"] = f"{row['val_bits_per_dim']:.3f}"
        if row.get("val_error") == row.get("val_error") and "val_error" in row:
            postfix["val_err"] = f"{100 * row['val_error']:.1f}%"
        self.epochs.set_postfix(postfix)
        self.epochs.update(1)

    def on_end(self, trainer, result) -> None:
        for bar in (self.iterations, self.epochs):
            if bar is not None:
                bar.close()
        self.iterations = self.epochs = None
