"""Derivatives beyond the first: double backward (create_graph=True), gradgradcheck, Hessians,
nested torch.func transforms and forward-mode AD, on every module and cell, against torch.nn."""
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch.autograd import gradgradcheck
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfast

LAYERS = {
    "lstm": dict(cls="LSTM"),
    "lstm_2layer_bidirectional_batch_first": dict(cls="LSTM", num_layers=2, bidirectional=True,
                                                  batch_first=True),
    "lstm_proj": dict(cls="LSTM", proj_size=1),
    "lstm_no_bias": dict(cls="LSTM", bias=False),
    "gru": dict(cls="GRU"),
    "gru_2layer_bidirectional": dict(cls="GRU", num_layers=2, bidirectional=True),
    "rnn_tanh": dict(cls="RNN"),
    "rnn_relu_bidirectional": dict(cls="RNN", nonlinearity="relu", bidirectional=True),
}


def _pair(name, input_size=2, hidden_size=2):
    """An rnnfast layer and torch.nn's with the same configuration and parameters, float64."""
    kw = dict(LAYERS[name])
    cls = kw.pop("cls")
    ours = getattr(rnnfast, cls)(input_size, hidden_size, **kw).double()
    theirs = getattr(nn, cls)(input_size, hidden_size, **kw).double()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _input(module, steps=3, batch=2, device="cpu"):
    shape = (batch, steps, module.input_size) if module.batch_first else (
        steps, batch, module.input_size)
    return torch.randn(shape, dtype=torch.float64, device=device)


def _initial_state(module, batch=2, device="cpu"):
    layers = module.num_layers * (2 if module.bidirectional else 1)
    state = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    h0 = torch.randn(layers, batch, state, dtype=torch.float64, device=device,
                     requires_grad=True)
    if isinstance(module, rnnfast.LSTM):
        c0 = torch.randn(layers, batch, module.hidden_size, dtype=torch.float64, device=device,
                         requires_grad=True)
        return (h0, c0)
    return (h0,)


def _as_function(module, with_state):
    """f(x, *states, *parameters) -> (output, *final states) of `module`."""
    names = [n for n, _ in module.named_parameters()]
    is_lstm = isinstance(module, (nn.LSTM, rnnfast.LSTM))

    def f(x, *rest):
        states, params = (rest[:2] if is_lstm else rest[:1]), rest
        if with_state:
            params = rest[len(states):]
            hx = tuple(states) if is_lstm else states[0]
            output, state = torch.func.functional_call(module, dict(zip(names, params)), (x, hx))
        else:
            output, state = torch.func.functional_call(module, dict(zip(names, params)), (x,))
        return (output, *(state if is_lstm else (state,)))
    return f


@pytest.mark.parametrize("name,with_state", [
    (name, False) for name in LAYERS if name != "lstm_2layer_bidirectional_batch_first"] + [
    ("lstm_2layer_bidirectional_batch_first", True), ("gru", True), ("rnn_tanh", True)])
def test_gradgradcheck_layers(name, with_state, device):
    torch.manual_seed(0)
    ours = _pair(name)[0].to(device)
    x = _input(ours, device=device).requires_grad_()
    states = _initial_state(ours, device=device) if with_state else ()
    assert gradgradcheck(_as_function(ours, with_state), (x, *states, *ours.parameters()))


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn_relu_bidirectional"])
def test_gradgradcheck_packed(name):
    torch.manual_seed(1)
    ours, _ = _pair(name)
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in ours.named_parameters()]

    def f(x, *params):
        packed = pack_padded_sequence(x, torch.tensor([4, 2, 1]))
        output, _ = torch.func.functional_call(ours, dict(zip(names, params)), (packed,))
        return output.data

    assert gradgradcheck(f, (x, *ours.parameters()))


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
def test_gradgradcheck_cells(cls):
    torch.manual_seed(2)
    cell = getattr(rnnfast, cls)(3, 4).double()
    names = [n for n, _ in cell.named_parameters()]
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    states = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
              for _ in range(2 if cls == "LSTMCell" else 1)]

    def f(x, *rest):
        hx = tuple(rest[:2]) if cls == "LSTMCell" else rest[0]
        return torch.func.functional_call(cell, dict(zip(names, rest[len(states):])), (x, hx))

    assert gradgradcheck(f, (x, *states, *cell.parameters()))


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradient_penalty_matches_torch_nn(name, device):
    """loss.backward() after autograd.grad(..., create_graph=True): every parameter's and the
    input's gradient as torch.nn's (on the CPU: cuDNN's RNNs have no double backward)."""
    torch.manual_seed(3)
    ours, theirs = _pair(name)
    ours.to(device)
    x = _input(ours)
    results = []
    for module in (ours, theirs):
        x_leaf = x.clone().to(next(module.parameters()).device).requires_grad_()
        output = module(x_leaf)[0]
        (grad_x,) = torch.autograd.grad(output.square().sum(), x_leaf, create_graph=True)
        (grad_x.square().sum() + output.sum()).backward()
        results.append([x_leaf.grad] + [p.grad for p in module.parameters()])
    for got, want in zip(*results):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["lstm_proj", "gru", "rnn_relu_bidirectional"])
def test_hessian_and_forward_mode_match_torch_nn(name):
    torch.manual_seed(4)
    ours, theirs = _pair(name)
    x = _input(ours, steps=3)

    def loss(module):
        return lambda inputs: module(inputs)[0].tanh().sum()

    torch.testing.assert_close(torch.func.hessian(loss(ours))(x),
                               torch.func.hessian(loss(theirs))(x), rtol=1e-9, atol=1e-11)
    tangent = torch.randn_like(x)
    tangents = []
    for module in (ours, theirs):
        with forward_ad.dual_level():
            output = module(forward_ad.make_dual(x, tangent))[0]
            tangents.append(forward_ad.unpack_dual(output).tangent)
    torch.testing.assert_close(tangents[0], tangents[1], rtol=1e-10, atol=1e-12)


def test_first_order_backward_records_no_graph():
    """Without create_graph the fused backward runs: the gradients have no history."""
    torch.manual_seed(5)
    ours, _ = _pair("lstm")
    x = _input(ours).requires_grad_()
    grads = torch.autograd.grad(ours(x)[0].sum(), [x, *ours.parameters()])
    assert all(g.grad_fn is None and not g.requires_grad for g in grads)
