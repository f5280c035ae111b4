"""Tests of the tolerance policies: REINFORCE gradients and learning, clamping, evaluation, probes."""

import math

import pytest
import torch
from torch import nn

from infocnf.config import (
    ConditioningConfig,
    DataConfig,
    ModelConfig,
    RunConfig,
    SolverConfig,
    ToleranceConfig,
    TrainConfig,
)
from infocnf.data import load_splits
from infocnf.evaluate import evaluate
from infocnf.flows import FlatCNF, MultiscaleCNF
from infocnf.model import ConditionalCNF
from infocnf.solve import SolveStats, solve_cnf
from infocnf.tolerance import FixedPlan, LearnedPolicy, build_policy
from infocnf.train import Trainer

LEARNED = ToleranceConfig(strategy="learned")


class LinearField(nn.Module):
    """f(t, z) = A z for z of shape (batch, features)."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ self.matrix.T


FLOWS = {
    "flat": lambda: FlatCNF(6, ModelConfig(hidden_dims=(16,), num_blocks=2)),
    "conv": lambda: MultiscaleCNF((1, 4, 4), ModelConfig(architecture="multiscale", hidden_dims=(8,), num_blocks=1, num_scales=2)),
}


@pytest.mark.parametrize("name", FLOWS)
def test_learned_gates_get_reinforce_gradient(name):
    flow = FLOWS[name]()
    policy = LearnedPolicy(flow.block_shapes, LEARNED)
    x = torch.randn(4, *flow.block_shapes[0])
    plan = policy.plan(SolverConfig())
    out = flow(x, plan)
    assert [s.atol for s in out.stats] == plan.tolerances

    loss = policy.policy_loss(plan, out.stats, task_loss=out.z.pow(2).mean())
    loss.backward()
    for param_name, param in policy.named_parameters():
        assert param.grad is not None, param_name
        # Rounding leaves gradients near 1e-10 on parameters that the loss does not depend on,
        # such as a conv bias before BatchNorm. A real gradient here is above 1e-6.
        assert float(param.grad.abs().max()) > 1e-8, param_name
    # The advantage is detached: the REINFORCE term trains the gates only, not the flow.
    assert all(param.grad is None for param in flow.parameters())


def test_policy_loss_returns_by_hand():
    config = ToleranceConfig(
        strategy="learned", nfe_reward_scale=0.01, discount=0.5, task_reward_weight=0.1, reinforce_weight=2.0
    )
    policy = LearnedPolicy([(3,), (3,)], config)
    x = torch.randn(4, 3)

    def decide(stats):
        plan = policy.plan(SolverConfig())
        plan(0, x)
        plan(1, x)
        log_probs = [d.log_prob for d in plan.decisions]
        return policy.policy_loss(plan, stats, task_loss=torch.tensor(3.0)), log_probs

    stats = [SolveStats(nfe_forward=20), SolveStats(nfe_forward=30)]
    loss, (lp0, lp1) = decide(stats)
    # Terminal reward -0.1 * 3 = -0.3; r_1 = -0.30 + 0.5 * -0.3 = -0.45; r_0 = -0.20 + 0.5 * -0.45 = -0.425.
    # The baseline starts at 0, so the advantages are the returns.
    expected = -2.0 * (-0.425 * lp0 - 0.45 * lp1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    # The bias-corrected baseline now equals these returns, so the same outcome has no advantage.
    loss, _ = decide(stats)
    assert loss.item() == pytest.approx(0.0, abs=1e-9)

    # Fewer NFE than the baseline expects: advantages +0.15 and +0.20 reinforce the choices.
    loss, (lp0, lp1) = decide([SolveStats(nfe_forward=10), SolveStats(nfe_forward=10)])
    expected = -2.0 * ((-0.1 + 0.5 * -0.25 + 0.425) * lp0 + (-0.1 + 0.5 * -0.3 + 0.45) * lp1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_learned_policy_moves_looser():
    # Toy problem: a fixed random field solved up to t1 = 10, where dopri5 needs 38 NFE at
    # tolerance 1e-5, 26 at 1e-4 and 20 at 1e-3 (torchdiffeq 0.2.5), so looser is cheaper.
    flow = FlatCNF(2, ModelConfig(hidden_dims=(16,), num_blocks=1, t1=10.0))
    flow.requires_grad_(False)
    x = torch.randn(4, 2)
    solver = SolverConfig()
    policy = LearnedPolicy(flow.block_shapes, LEARNED)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)

    def mean_log10_tolerance() -> float:
        with torch.no_grad():
            return float(policy.distribution(0, x)[0])

    def mean_plan_nfe() -> int:
        return flow(x, policy.mean_plan(solver)).stats[0].nfe_forward

    start_mean, start_nfe = mean_log10_tolerance(), mean_plan_nfe()
    for _ in range(150):
        plan = policy.plan(solver)
        options = plan(0, x)  # Samples a tolerance and records its log-probability.
        with torch.no_grad():
            stats = flow.blocks[0](x, options).stats
        loss = policy.policy_loss(plan, [stats], task_loss=torch.zeros(()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert start_mean == pytest.approx(LEARNED.log10_init, abs=0.1)
    # At least one decade looser, and the solve at the policy mean is cheaper.
    assert mean_log10_tolerance() > start_mean + 1.0
    assert mean_plan_nfe() < start_nfe


def test_learned_samples_inside_clamp():
    config = ToleranceConfig(strategy="learned", log10_min=-6.0, log10_max=-3.0, log10_init=-4.5, init_log_std=1.5)
    policy = LearnedPolicy([(3,)], config)
    x = torch.randn(4, 3)
    plan = policy.plan(SolverConfig())
    log10_tolerances = [math.log10(plan(0, x).atol) for _ in range(300)]
    # A std of exp(1.5) = 4.5 decades puts most raw samples outside [-6, -3]: both edges are hit.
    assert min(log10_tolerances) == pytest.approx(-6.0, abs=1e-12)
    assert max(log10_tolerances) == pytest.approx(-3.0, abs=1e-12)
    assert all(-6.0 - 1e-12 <= v <= -3.0 + 1e-12 for v in log10_tolerances)

    # Real solves at sampled tolerances record them in their stats.
    flow = FlatCNF(3, ModelConfig(hidden_dims=(8,), num_blocks=1))
    for _ in range(5):
        stats = flow(x, policy.plan(SolverConfig())).stats[0]
        assert stats.atol == stats.rtol
        assert -6.0 - 1e-12 <= math.log10(stats.atol) <= -3.0 + 1e-12


def test_learned_mean_stays_inside_range():
    config = ToleranceConfig(strategy="learned", log10_min=-6.0, log10_max=-3.0, log10_init=-4.5)
    policy = LearnedPolicy([(3,)], config)
    x = torch.randn(4, 3)
    for bias, edge in ((50.0, -3.0), (-50.0, -6.0)):
        with torch.no_grad():
            policy.gates[0].out.bias[0] = bias  # Far past either end of the range.
        mean, _ = policy.distribution(0, x)
        assert -6.0 <= float(mean) <= -3.0
        assert float(mean) == pytest.approx(edge, abs=1e-9)
        options = policy.mean_plan(SolverConfig())(0, x)
        assert math.log10(options.atol) == pytest.approx(edge, abs=1e-9)


def test_learned_mean_starts_at_init():
    config = ToleranceConfig(strategy="learned", log10_min=-8.0, log10_max=-2.0, log10_init=-5.0)
    policy = LearnedPolicy([(3,)], config)
    with torch.no_grad():
        policy.gates[0].out.weight.zero_()
    mean, log_std = policy.distribution(0, torch.randn(4, 3))
    assert float(mean) == pytest.approx(-5.0, abs=1e-9)
    assert float(log_std) == pytest.approx(config.init_log_std, abs=1e-9)


def tiny_run_config(strategy: str, **tolerance) -> RunConfig:
    return RunConfig(
        data=DataConfig(name="digits", max_examples=128),
        model=ModelConfig(hidden_dims=(16,), num_blocks=1),
        conditioning=ConditioningConfig(method="infocnf"),
        solver=SolverConfig(
            eval_tolerance=1e-3, extra_eval_tolerances=(1e-4,), tolerance=ToleranceConfig(strategy=strategy, **tolerance)
        ),
        train=TrainConfig(epochs=1, batch_size=64, eval_batch_size=128, device="cpu"),
    )


def test_evaluate_uses_fixed_plan_tolerance():
    config = tiny_run_config("fixed")
    splits = load_splits(config.data)
    model = ConditionalCNF(splits.shape, splits.levels, splits.num_classes, config)
    result = evaluate(model, splits.val, lambda: FixedPlan(config.solver, tolerance=2e-4), batch_size=50, seed=0)
    # tolerance_min and tolerance_max are taken over SolveStats.atol of every block and batch.
    # Plans store log10 tolerances, so 2e-4 comes back as 10 ** log10(2e-4), 1 ulp away.
    assert result["tolerance_min"] == result["tolerance_max"]
    assert result["tolerance_min"] == pytest.approx(2e-4, rel=1e-15)


def test_trainer_evaluates_learned_at_fixed_tolerance(tmp_path):
    config = tiny_run_config("learned", log10_min=-2.5, log10_max=-1.5, log10_init=-2.0)
    result = Trainer(config, tmp_path).fit(resume=False)
    assert result.status == "finished"
    # Training solves at sampled tolerances in [10^-2.5, 10^-1.5], far from the evaluation 1e-3.
    row = result.history[0]
    assert -2.5 <= row["train_log10_tol_block_0_q10"] <= row["train_log10_tol_block_0_q90"] <= -1.5
    for prefix in ("val", "test"):
        assert row[f"{prefix}_tolerance_min"] == row[f"{prefix}_tolerance_max"] == 1e-3
        assert result.metrics[f"{prefix}_tolerance_min"] == result.metrics[f"{prefix}_tolerance_max"] == 1e-3
    assert result.metrics["eval_tolerance"] == 1e-3


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_strategies_share_trace_estimator(probe):
    solver = SolverConfig(probe=probe, divergence="hutchinson")
    strategies = {
        "fixed": ToleranceConfig(strategy="fixed", value=1e-4),
        "manual": ToleranceConfig(strategy="manual", per_block=(1e-4,)),
        "learned": ToleranceConfig(strategy="learned"),
    }
    matrix = torch.diag(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.randn(32, 3)
    deltas = {}
    for name, config in strategies.items():
        policy = build_policy(config, [(3,)])
        for plan in (policy.plan(solver), policy.mean_plan(solver)):
            options = plan(0, x)
            assert (options.divergence, options.probe, options.method) == ("hutchinson", probe, "dopri5"), name
        with torch.no_grad():
            deltas[name] = solve_cnf(LinearField(matrix), x, policy.plan(solver)(0, x)).delta_log_prob
    eval_options = FixedPlan(solver, tolerance=1e-5)(0, x)
    assert (eval_options.divergence, eval_options.probe) == ("hutchinson", probe)

    # The probe really reaches the solve: for a diagonal field a Rademacher probe gives the exact
    # trace in every example, a Gaussian one does not.
    exact = torch.full((32,), -float(torch.trace(matrix)))
    for name, delta in deltas.items():
        if probe == "rademacher":
            torch.testing.assert_close(delta, exact, rtol=0, atol=1e-5, msg=name)
        else:
            assert float((delta - exact).abs().max()) > 0.1, name
