"""The flow under check: a flat CNF with a conditioning head, trained on a labelled Gaussian mixture."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..conditioning import ConditioningHead
from ..config import ConditioningConfig, ModelConfig
from ..flows import FlatCNF, FlowOutput
from ..solve import SolveOptions
from ..train import resolve_device, seed_everything
from .config import DensityCheckConfig, MixtureConfig

__all__ = ["DensityModel", "sample_mixture", "mixture_log_prob", "train_density_model", "load_or_train_density_model"]

log = logging.getLogger(__name__)


def sample_mixture(mixture: MixtureConfig, n: int, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw n points of shape (n, features) and their component labels of shape (n,)."""
    probabilities = torch.tensor(mixture.probabilities, dtype=torch.float64)
    labels = torch.multinomial(probabilities, n, replacement=True, generator=generator)
    means = torch.tensor(mixture.means, dtype=dtype)  # (components, features)
    noise = torch.randn(n, mixture.dim, generator=generator, dtype=dtype)
    return means[labels] + math.sqrt(mixture.variance) * noise, labels


def mixture_log_prob(mixture: MixtureConfig, x: torch.Tensor) -> torch.Tensor:
    """Exact log-density of the mixture at x of shape (batch, features); returns shape (batch,)."""
    means = torch.tensor(mixture.means, dtype=x.dtype, device=x.device)  # (components, features)
    log_weights = torch.tensor(mixture.probabilities, dtype=x.dtype, device=x.device).log()
    squared = (x[:, None, :] - means[None]).pow(2).sum(dim=-1)  # (batch, components)
    log_normal = -0.5 * squared / mixture.variance - 0.5 * mixture.dim * math.log(2 * math.pi * mixture.variance)
    return torch.logsumexp(log_normal + log_weights, dim=1)


class DensityModel(nn.Module):
    """Density of real-valued points of shape (batch, features) under a flat CNF and a label prior.

    There is no logit transform, so log p(x | y) = log p_z(z | y) - delta_log_prob, where the flow
    maps x to z and delta_log_prob is the log-density change the solve returns.
    """

    def __init__(self, dim: int, num_classes: int, model: ModelConfig, conditioning: ConditioningConfig):
        super().__init__()
        self.dim = dim
        self.num_classes = num_classes
        self.flow = FlatCNF(dim, model)
        self.head = ConditioningHead(dim, num_classes, conditioning)

    @property
    def conditional(self) -> bool:
        return self.head.conditional

    def encode(self, x: torch.Tensor, options: SolveOptions) -> FlowOutput:
        """Map x of shape (batch, features) to z, solving every block with the same options."""
        return self.flow(x, lambda block, block_input: options)

    def log_prob_from_latent(self, z: torch.Tensor, delta_log_prob: torch.Tensor,
                             labels: torch.Tensor | None) -> torch.Tensor:
        """log p(x | y) of shape (batch,) from the flow output; labels None gives log p(x) (classes summed out)."""
        if labels is None:
            return self.head.marginal_log_prob(z) - delta_log_prob
        return self.head.log_prob(z, labels) - delta_log_prob

    def log_prob(self, x: torch.Tensor, labels: torch.Tensor | None, options: SolveOptions) -> torch.Tensor:
        """log p(x | y) of shape (batch,) for x of shape (batch, features); labels None gives log p(x)."""
        out = self.encode(x, options)
        return self.log_prob_from_latent(out.z, out.delta_log_prob, labels)


def _build_model(config: DensityCheckConfig) -> DensityModel:
    mixture = config.mixture
    return DensityModel(mixture.dim, mixture.num_components, config.model, config.conditioning)


def train_density_model(config: DensityCheckConfig,
                        on_iteration: Callable[[int, float], None] | None = None) -> DensityModel:
    """Train a density model on fresh mixture samples and return it in eval mode.

    The loss is the mean negative log-likelihood in nats, of p(x | component) for a conditional
    model, plus conditioning.ce_weight times the classifier's cross-entropy. Every solve uses
    exact divergence at atol = rtol = train.tolerance. ``on_iteration(iteration, loss)`` is called
    after each step, for example to drive a progress bar.
    """
    seed_everything(config.seed)
    device = resolve_device(config.train.device)
    model = _build_model(config).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    cfg = config.train
    options = SolveOptions(atol=cfg.tolerance, rtol=cfg.tolerance, divergence="exact")
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    model.train()
    start = time.monotonic()
    for iteration in range(1, cfg.iterations + 1):
        x, labels = sample_mixture(config.mixture, cfg.batch_size, generator)
        x, labels = x.to(device), labels.to(device)
        out = model.encode(x, options)
        log_prob = model.log_prob_from_latent(out.z, out.delta_log_prob, labels if model.conditional else None)
        loss = -log_prob.mean()
        logits = model.head.logits(out.z)
        if logits is not None:
            loss = loss + config.conditioning.ce_weight * F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
        if on_iteration is not None:
            on_iteration(iteration, loss_value)
        if iteration % cfg.log_every == 0 or iteration == cfg.iterations:
            nfe = sum(s.nfe_forward for s in out.stats)
            log.info("iteration %d/%d: loss %.4f nats, forward NFE %d, %.1f s", iteration, cfg.iterations,
                     loss_value, nfe, time.monotonic() - start)
    return model.eval()


@torch.no_grad()
def _held_out_nll(model: DensityModel, config: DensityCheckConfig, n: int = 4000) -> tuple[float, float]:
    # Model and exact mixture negative log-likelihoods (nats) of the same fresh samples, at a tight tolerance.
    generator = torch.Generator().manual_seed(config.seed + 1)
    x, _ = sample_mixture(config.mixture, n, generator)
    device = next(model.parameters()).device
    options = SolveOptions(atol=1e-6, rtol=1e-6, divergence="exact", max_num_steps=config.sweep.max_num_steps)
    model_nll = -float(model.log_prob(x.to(device), None, options).mean())
    mixture_nll = -float(mixture_log_prob(config.mixture, x).mean())
    return model_nll, mixture_nll


def load_or_train_density_model(config: DensityCheckConfig, checkpoint: str | Path | None = None,
                                on_iteration: Callable[[int, float], None] | None = None) -> DensityModel:
    """Return the density model the config describes, loaded from ``checkpoint`` or trained.

    A checkpoint is reused when it was trained with the same settings (everything but the sweep).
    Otherwise the model is trained and, when ``checkpoint`` is given, saved there. A checkpoint
    from other settings raises ValueError instead of being overwritten.
    """
    path = Path(checkpoint) if checkpoint is not None else None
    device = resolve_device(config.train.device)
    if path is not None and path.is_file():
        state = torch.load(path, map_location=device, weights_only=False)
        if state.get("model_hash") != config.model_hash():
            raise ValueError(
                f"checkpoint {path} was trained with other settings (hash {state.get('model_hash')!r}, "
                f"expected {config.model_hash()!r}); choose another output folder or delete the checkpoint to retrain"
            )
        model = _build_model(config).to(device)
        model.load_state_dict(state["state_dict"])
        log.info("loaded the trained flow from %s", path)
        return model.eval()
    start = time.monotonic()
    model = train_density_model(config, on_iteration)
    elapsed_s = time.monotonic() - start
    model_nll, mixture_nll = _held_out_nll(model, config)
    log.info("trained in %.1f s: held-out NLL %.4f nats (the exact mixture scores %.4f)", elapsed_s, model_nll,
             mixture_nll)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model_hash": config.model_hash(),
            "config": config.to_dict(),
            "state_dict": model.state_dict(),
            "train_elapsed_s": elapsed_s,
            "held_out_nll": model_nll,
            "mixture_nll": mixture_nll,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    return model
