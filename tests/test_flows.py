"""Property test over every flow variant, squeeze, multiscale checks and the cifar10 preset."""

import math
from pathlib import Path

import pytest
import torch

from infocnf.config import ModelConfig, load_config
from infocnf.flows import FlatCNF, MultiscaleCNF
from infocnf.model import ConditionalCNF
from infocnf.solve import SolveOptions
from infocnf.transforms import squeeze, unsqueeze

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_multiscale(shape, num_scales):
    config = ModelConfig(architecture="multiscale", hidden_dims=(8,), num_blocks=1, num_scales=num_scales, train_t1=True)
    return MultiscaleCNF(shape, config)


# name: (builder, input shape without batch, expected input shape of each block)
FLOW_VARIANTS = {
    "flat": (
        lambda: FlatCNF(6, ModelConfig(hidden_dims=(16,), num_blocks=2, train_t1=True)),
        (6,),
        [(6,), (6,)],
    ),
    "multiscale-1x4x4": (
        lambda: tiny_multiscale((1, 4, 4), num_scales=2),
        (1, 4, 4),
        [(1, 4, 4), (4, 2, 2), (2, 2, 2)],
    ),
    "multiscale-3x4x4": (
        lambda: tiny_multiscale((3, 4, 4), num_scales=3),
        (3, 4, 4),
        [(3, 4, 4), (12, 2, 2), (6, 2, 2), (24, 1, 1), (12, 1, 1)],
    ),
}


def plan_at(tol: float, divergence: str = "hutchinson"):
    return lambda block, x: SolveOptions(atol=tol, rtol=tol, divergence=divergence)


@pytest.mark.parametrize("name", FLOW_VARIANTS)
def test_flow_properties(name, tmp_path):
    make_flow, shape, block_shapes = FLOW_VARIANTS[name]
    flow = make_flow().double()
    dim = math.prod(shape)
    x = torch.randn(2, *shape, dtype=torch.float64)

    # Shapes: latent (batch, features), one delta_log_prob per example, one stats record per block.
    out = flow(x, plan_at(1e-5))
    assert flow.block_shapes == block_shapes
    assert out.z.shape == (2, dim)
    assert out.delta_log_prob.shape == (2,)
    assert len(out.stats) == len(flow.blocks) == len(block_shapes)

    # Every parameter, the learned end times included, gets a non-zero gradient.
    (out.z.pow(2).sum() + out.delta_log_prob.sum()).backward()
    for param_name, param in flow.named_parameters():
        assert param.grad is not None, param_name
        assert float(param.grad.abs().max()) > 0, param_name

    with torch.no_grad():
        # z -> x -> z round trip. At tolerance 1e-8 the measured error is below 1e-7.
        z = torch.randn(2, dim, dtype=torch.float64)
        x_back = flow.inverse(z, plan_at(1e-8))
        assert x_back.shape == (2, *shape)
        torch.testing.assert_close(flow(x_back, plan_at(1e-8)).z, z, rtol=0, atol=1e-6)

        # -delta_log_prob is log|det dz/dx| of the whole flow.
        x_one = x[:1]
        delta = flow(x_one, plan_at(1e-8, divergence="exact")).delta_log_prob
    jacobian = torch.autograd.functional.jacobian(
        lambda v: flow(v, plan_at(1e-8)).z.reshape(-1), x_one, vectorize=True
    ).reshape(dim, dim)
    log_det = torch.linalg.slogdet(jacobian).logabsdet
    # Both sides carry solver error (measured differences below 1e-7), and the exact
    # divergence keeps delta free of probe noise.
    assert float(log_det) == pytest.approx(-float(delta), abs=1e-6)

    # Save and load: a fresh flow with other weights reproduces the outputs exactly.
    path = tmp_path / "flow.pt"
    torch.save(flow.state_dict(), path)
    torch.manual_seed(123)
    loaded = make_flow().double()
    loaded.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        torch.manual_seed(7)
        expected = flow(x, plan_at(1e-5))
        torch.manual_seed(7)
        actual = loaded(x, plan_at(1e-5))
    assert torch.equal(actual.z, expected.z)
    assert torch.equal(actual.delta_log_prob, expected.delta_log_prob)


def test_squeeze_unsqueeze_inverse():
    x = torch.randn(2, 3, 4, 6)
    y = squeeze(x)
    assert y.shape == (2, 12, 2, 3)
    assert torch.equal(unsqueeze(y), x)
    assert torch.equal(squeeze(unsqueeze(y)), y)


def test_squeeze_channel_layout():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    # Each 2x2 patch becomes 4 channels in row-major order: a permutation, so volume preserving.
    assert squeeze(x).flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert squeeze(x).shape == (1, 4, 1, 1)


@pytest.mark.parametrize(
    "shape, num_scales, divisor", [((1, 4, 4), 4, 8), ((3, 6, 6), 3, 4), ((1, 8, 6), 3, 4)]
)
def test_multiscale_rejects_indivisible_side(shape, num_scales, divisor):
    config = ModelConfig(architecture="multiscale", hidden_dims=(8,), num_blocks=1, num_scales=num_scales)
    message = f"num_scales = {num_scales} .* divisible by {divisor}; lower num_scales"
    with pytest.raises(ValueError, match=message):
        MultiscaleCNF(shape, config)


def test_cifar10_preset_parameter_count():
    config = load_config(CONFIGS / "cifar10-infocnf.toml")
    assert config.data.name == "cifar10"
    assert config.model.hidden_dims == (64, 64, 64)
    assert (config.model.num_blocks, config.model.num_scales) == (2, 4)
    assert config.conditioning.method == "infocnf"
    assert (config.train.batch_size, config.train.lr, config.train.epochs) == (900, 1e-3, 400)
    assert (config.train.lr_decay_epochs, config.train.lr_decay_factor) == ((250,), 0.1)

    model = ConditionalCNF((3, 32, 32), 256, 10, config)
    # 2 blocks before and 2 after each of the 3 squeezes, and 2 on the last scale.
    assert len(model.flow.blocks) == 14
    channels = [block.field.layers[0].conv.in_channels - 1 for block in model.flow.blocks]
    assert channels == [3, 3, 12, 12, 6, 6, 24, 24, 12, 12, 48, 48, 24, 24]

    # Per block with c channels: 3x3 convolutions (c+1)->64->64->64->c with time as an extra
    # input channel, so 1162 c + 75648 weights and biases, plus log_t1.
    flow_count = sum(1162 * c + 75648 + 1 for c in channels)
    # Prior encoder Linear(10, 2 * 1536) and classifier Linear(1536, 10) on z_y.
    head_count = (10 * 3072 + 3072) + (1536 * 10 + 10)
    assert sum(p.numel() for p in model.flow.parameters()) == flow_count == 1_358_882
    assert sum(p.numel() for p in model.head.parameters()) == head_count == 49_162
    assert sum(p.numel() for p in model.parameters()) == 1_408_044
