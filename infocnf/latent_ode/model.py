"""LatentODE: a GRU reading the window backwards, an ODE in latent space, a decoder and the ELBO."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchdiffeq import odeint

from ..fields import make_activation
from ..solve import SolveError, SolveOptions, SolveStats
from .config import LatentModelConfig, LatentPriorConfig

__all__ = ["LatentODE", "LatentODEOutput", "gaussian_kl", "observation_log_likelihood", "solve_latent"]

_LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(
    mean_q: torch.Tensor, log_std_q: torch.Tensor, mean_p: torch.Tensor, log_std_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean_q, std_q^2) || N(mean_p, std_p^2)) of diagonal Gaussians: (batch, features) -> (batch,).

    Per feature: log(std_p / std_q) + (std_q^2 + (mean_q - mean_p)^2) / (2 std_p^2) - 1/2.
    """
    var_ratio = torch.exp(2 * (log_std_q - log_std_p))
    mean_term = ((mean_q - mean_p) * torch.exp(-log_std_p)).pow(2)
    return 0.5 * (var_ratio + mean_term - 1.0 - 2 * (log_std_q - log_std_p)).sum(dim=-1)


def observation_log_likelihood(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std^2 I) summed over points and coordinates: (batch, points, 2) -> (batch,)."""
    per_value = -0.5 * (((x - mean) / std).pow(2) + 2 * math.log(std) + _LOG_2PI)
    return per_value.flatten(1).sum(dim=1)


def _mlp(dim_in: int, hidden_dims: tuple[int, ...], dim_out: int, activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    widths = (dim_in, *hidden_dims)
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), make_activation(activation)]
    layers.append(nn.Linear(widths[-1], dim_out))
    return nn.Sequential(*layers)


class _BackwardCounter(torch.autograd.Function):
    """Identity whose backward counts one backward pass through the latent field."""

    @staticmethod
    def forward(ctx, x, stats):
        ctx.stats = stats
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.stats.nfe_backward += 1
        return grad, None


class _LatentDynamics(nn.Module):
    """dz/dt = f(z) for one solve; its NFE counts live in that solve's stats and nowhere else."""

    def __init__(self, field: nn.Module, stats: SolveStats, options: SolveOptions):
        super().__init__()
        self.field = field
        self.stats = stats
        self.options = options

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.stats.nfe_forward += 1
        dz = self.field(z)
        if torch.is_grad_enabled():
            dz = _BackwardCounter.apply(dz, self.stats)
        return dz

    def callback_accept_step(self, t0, y0, dt):
        self.stats.accepted_steps += 1

    def callback_reject_step(self, t0, y0, dt):
        self.stats.rejected_steps += 1


def solve_latent(field: nn.Module, z0: torch.Tensor, times: torch.Tensor, options: SolveOptions) -> tuple[torch.Tensor, SolveStats]:
    """Integrate the autonomous field from z0 (batch, latent) at times[0] through ``times``.

    ``times`` (points,) is strictly increasing, or strictly decreasing for a backward solve.
    Returns the states (points, batch, latent), whose first entry is z0, and the solve's statistics.
    """
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"invalid times of shape {tuple(times.shape)}: expected at least 2 points in one dimension")
    stats = SolveStats(atol=float(options.atol), rtol=float(options.rtol), method=options.method)
    dynamics = _LatentDynamics(field, stats, options)
    try:
        path = odeint(
            dynamics,
            z0,
            times,
            rtol=float(options.rtol),
            atol=float(options.atol),
            method=options.method,
            options={"max_num_steps": options.max_num_steps},
        )
    except AssertionError as exc:
        # torchdiffeq 0.2.x signals step-size underflow and an exhausted step budget by assertions.
        text = str(exc)
        if "max_num_steps" in text:
            raise SolveError(
                "step_budget_exceeded",
                f"the latent solve needed more than solver.max_num_steps = {options.max_num_steps} steps at "
                f"rtol={options.rtol:g}, atol={options.atol:g}; raise max_num_steps or loosen the tolerance",
                stats,
            ) from exc
        status = "step_size_underflow" if "underflow" in text else "non_finite"
        raise SolveError(status, f"the latent solve failed ({text}); lower train.lr or loosen the tolerance", stats) from exc
    if not bool(torch.isfinite(path).all()):
        raise SolveError("non_finite", "the latent state became NaN or infinite; lower train.lr or tighten train.grad_clip", stats)
    return path, stats


@dataclass
class LatentODEOutput:
    """One forward pass: posterior of z0, the z0 used, decoded window, ELBO terms and logits.

    ``mean``, ``log_std`` and ``z0`` are (batch, latent); ``prediction`` (batch, points, 2);
    ``log_likelihood`` and ``kl`` (batch,); ``logits`` (batch, classes) or None without a
    partitioned prior.
    """

    mean: torch.Tensor
    log_std: torch.Tensor
    z0: torch.Tensor
    prediction: torch.Tensor
    log_likelihood: torch.Tensor
    kl: torch.Tensor
    logits: torch.Tensor | None
    stats: SolveStats


class LatentODE(nn.Module):
    """Latent ODE with either an N(0, I) prior on z0 or a partitioned one.

    The GRU reads the observed window from its last point to its first, so its final state
    summarises the window at its start, where z0 lives. With the "partitioned" prior, z0 splits
    into z_y (the first ``supervised_dim`` features), whose prior N(mean(y), std(y)^2) comes from
    a zero-initialised linear map of the one-hot direction label and which feeds a linear
    classifier, and z_u ~ N(0, I).
    """

    def __init__(self, model: LatentModelConfig, prior: LatentPriorConfig, num_classes: int = 2):
        super().__init__()
        self.latent_dim = model.latent_dim
        self.observation_std = model.observation_std
        self.num_classes = num_classes
        self.prior_method = prior.method
        self.ce_weight = prior.ce_weight
        # Inputs per step: the 2-D point and the time elapsed since the point read before it.
        self.encoder = nn.GRU(input_size=3, hidden_size=model.encoder_hidden, batch_first=True)
        self.encoder_head = nn.Linear(model.encoder_hidden, 2 * model.latent_dim)
        self.field = _mlp(model.latent_dim, model.ode_hidden_dims, model.latent_dim, model.activation)
        self.decoder = _mlp(model.latent_dim, model.decoder_hidden_dims, 2, model.activation)
        if prior.method == "partitioned":
            self.supervised_dim = min(model.latent_dim - 1, max(1, round(prior.supervised_ratio * model.latent_dim)))
            # One-hot label -> (mean, log-std) of z_y's prior; zero init starts from N(0, I).
            self.prior_encoder = nn.Linear(num_classes, 2 * self.supervised_dim)
            nn.init.zeros_(self.prior_encoder.weight)
            nn.init.zeros_(self.prior_encoder.bias)
            # The classifier keeps PyTorch's random init: with zero weights the cross-entropy sends no
            # gradient into the encoder, and a run whose z_y starts without direction information
            # stayed at chance (test error 0.47 after 20 epochs on the quick preset).
            self.classifier = nn.Linear(self.supervised_dim, num_classes)
            self.dropout = nn.Dropout(prior.classifier_dropout)
        else:
            self.supervised_dim = 0

    @property
    def partitioned(self) -> bool:
        return self.supervised_dim > 0

    def encode(self, observed: torch.Tensor, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z0 | window): observed (batch, points, 2), times (points,) -> mean, log_std (batch, latent)."""
        reversed_x = observed.flip(1)  # (batch, points, 2), last point first
        reversed_times = times.flip(0)
        # Elapsed time from the point read before, in reading order: 0, t[-1] - t[-2], ..., t[1] - t[0].
        gaps = torch.cat([torch.zeros_like(times[:1]), (reversed_times[:-1] - reversed_times[1:]).abs()])
        gaps = gaps[None, :, None].expand(observed.shape[0], -1, 1)  # (batch, points, 1)
        _, hidden = self.encoder(torch.cat([reversed_x, gaps], dim=-1))  # hidden (1, batch, hidden)
        mean, log_std = self.encoder_head(hidden[0]).chunk(2, dim=-1)
        return mean, log_std

    def prior_params(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std (batch, latent) of p(z0 | y); zeros for the N(0, I) prior."""
        zeros = torch.zeros(labels.shape[0], self.latent_dim, device=labels.device)
        if not self.partitioned:
            return zeros, zeros
        onehot = F.one_hot(labels, self.num_classes).to(self.prior_encoder.weight.dtype)
        mean_y, log_std_y = self.prior_encoder(onehot).chunk(2, dim=-1)  # (batch, supervised_dim) each
        rest = zeros[:, self.supervised_dim :]
        return torch.cat([mean_y, rest], dim=1), torch.cat([log_std_y, rest], dim=1)

    def logits(self, z0: torch.Tensor) -> torch.Tensor | None:
        """Direction logits (batch, classes) from z_y, or None without a partitioned prior."""
        if not self.partitioned:
            return None
        return self.classifier(self.dropout(z0[:, : self.supervised_dim]))

    def decode_path(self, z0: torch.Tensor, times: torch.Tensor, options: SolveOptions) -> tuple[torch.Tensor, SolveStats]:
        """Decoded trajectory (batch, points, 2) at ``times`` (points,), which starts at z0's time 0."""
        path, stats = solve_latent(self.field, z0, times, options)  # (points, batch, latent)
        return self.decoder(path).transpose(0, 1), stats

    def forward(
        self,
        observed: torch.Tensor,
        times: torch.Tensor,
        labels: torch.Tensor,
        options: SolveOptions,
        sample: bool = True,
        generator: torch.Generator | None = None,
    ) -> LatentODEOutput:
        """Encode the window, solve from z0 over ``times`` and score the fit.

        ``sample`` draws z0 = mean + std * eps (reparameterised), else z0 is the posterior mean.
        ``generator`` seeds eps, for repeatable evaluation.
        """
        if float(times[0]) != 0.0:
            raise ValueError(f"invalid times[0] = {float(times[0])}: z0 is the state at the first observed point, so times must start at 0")
        mean, log_std = self.encode(observed, times)
        z0 = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z0 = mean + torch.exp(log_std) * eps
        prediction, stats = self.decode_path(z0, times, options)
        prior_mean, prior_log_std = self.prior_params(labels)
        return LatentODEOutput(
            mean=mean,
            log_std=log_std,
            z0=z0,
            prediction=prediction,
            log_likelihood=observation_log_likelihood(observed, prediction, self.observation_std),
            kl=gaussian_kl(mean, log_std, prior_mean, prior_log_std),
            logits=self.logits(z0),
            stats=stats,
        )

    def loss(self, out: LatentODEOutput, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the training loss and its parts.

        loss = -ELBO / (points * 2) + ce_weight * CE, with -ELBO = KL - log p(x | z) per spiral
        averaged over the batch. Dividing by the number of observed values puts the ELBO on the
        scale of a per-value negative log-likelihood, so ce_weight means the same for any window.
        The cross-entropy is added, so lowering the loss lowers the classifier's CE.
        """
        num_values = out.prediction.shape[1] * out.prediction.shape[2]
        neg_elbo = (out.kl - out.log_likelihood).mean()
        parts = {
            "neg_elbo": neg_elbo.detach(),
            "neg_elbo_per_value": neg_elbo.detach() / num_values,
            "log_likelihood": out.log_likelihood.mean().detach(),
            "kl": out.kl.mean().detach(),
        }
        loss = neg_elbo / num_values
        if out.logits is not None:
            cross_entropy = F.cross_entropy(out.logits, labels)
            loss = loss + self.ce_weight * cross_entropy
            parts["cross_entropy"] = cross_entropy.detach()
            parts["errors"] = (out.logits.argmax(dim=1) != labels).sum().detach()
        return loss, parts
