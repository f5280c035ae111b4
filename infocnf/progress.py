"""tqdm progress bars as trainer callbacks, for the command line only."""

from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["EpochProgress"]


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
