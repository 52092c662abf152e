"""The CPU engine's float activations against torch's, over the whole range that matters.

An Elman layer with w_ih = [[1]], w_hh = [[0]] and no biases computes act(x) for every batch
row in one step, through the same vector code every cell uses (a batch of scalars is one run of
units): tanh and sigmoid come from one rational function (csrc/cpu/vector_math.h)."""
import pytest
import torch

import rnnfast  # noqa: F401  (registers the ops)

EPS = torch.finfo(torch.float32).eps


def activation(cell, x):
    n = x.numel()
    output = torch.ops.rnnfast.forward(cell, x.view(1, n, 1), None, None, torch.ones(1, 1),
                                       torch.zeros(1, 1), None, None, None, None, False, False)[0]
    return output.view(n)


def sample_points():
    """Dense over [-12, 12] (past where tanh rounds to +-1), log-spaced down to 1e-8 on both
    sides, and random normals."""
    generator = torch.Generator().manual_seed(0)
    tiny_to_ten = torch.logspace(-8, 1, 100_001)
    return torch.cat([torch.linspace(-12, 12, 1_000_001), tiny_to_ten, -tiny_to_ten,
                      3 * torch.randn(100_000, generator=generator)]).float()


def test_tanh_within_a_few_ulp():
    x = sample_points()
    got = activation("elman_tanh", x).double()
    expected = torch.tanh(x.double())
    # Relative to |tanh(x)|: a few units in the last place everywhere.
    error = (got - expected).abs() / expected.abs().clamp_min(torch.finfo(torch.float32).tiny)
    worst = int(error.argmax())
    assert error.max() <= 4 * EPS, (float(x[worst]), float(got[worst]), float(expected[worst]))


def test_sigmoid_within_float_resolution_of_one_half():
    """sigmoid = (1 + tanh(x / 2)) / 2: absolute error at the resolution of values near 1/2."""
    x = sample_points()
    got = activation("elman_sigmoid", x).double()
    expected = torch.sigmoid(x.double())
    error = (got - expected).abs()
    worst = int(error.argmax())
    assert error.max() <= 3e-7, (float(x[worst]), float(got[worst]), float(expected[worst]))
    assert bool(((got >= 0) & (got <= 1)).all())


@pytest.mark.parametrize("cell,expected", [("elman_tanh", torch.tanh),
                                           ("elman_sigmoid", torch.sigmoid)])
def test_saturation_nan_and_odd_symmetry(cell, expected):
    x = torch.tensor([-1e30, -100.0, -20.0, 0.0, 20.0, 100.0, 1e30, float("inf"),
                      float("-inf")])
    got = activation(cell, x)
    assert torch.allclose(got, expected(x), atol=1e-7, rtol=0)
    assert bool(activation(cell, torch.tensor([float("nan")])).isnan().all())
    if cell == "elman_tanh":
        y = torch.linspace(0, 9, 10_001)
        assert torch.equal(activation(cell, -y), -activation(cell, y))
