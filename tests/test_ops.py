"""The ops themselves: gradcheck, opcheck (on each device), torch.compile, extreme sizes,
op-level errors."""
import warnings
import zlib

import pytest
import torch
from torch import nn

import rnnfast
from cpu_features import runs_bf16_dot_products
from op_args import VARIANTS, backward_args, differentiable_outputs, make_args
from rnnfast import _ops
from thread_count import torch_threads

# Every cell, from the one table of cells (csrc/cells.h).
CELLS = list(_ops.CELLS)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_forward(cell, variant):
    # crc32, not hash(): str hashes change from run to run (PYTHONHASHSEED)
    args = make_args(cell, seed=zlib.crc32(f"{cell}/{variant}".encode()) % 1000, **VARIANTS[variant])
    inputs = tuple(args)
    assert torch.autograd.gradcheck(lambda *a: differentiable_outputs(*a), inputs)


@pytest.mark.parametrize("variant", [dict(), dict(reverse=True), dict(lengths=[3, 4, 1])],
                         ids=["plain", "reverse", "lengths"])
def test_gradcheck_projection(variant):
    args = make_args("lstm", hidden=4, proj=2, seed=7, **variant)
    assert torch.autograd.gradcheck(lambda *a: differentiable_outputs(*a), tuple(args))


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman_tanh"])
def test_backward_op_is_linear_in_incoming_gradients(cell):
    """The backward op maps incoming gradients linearly (the forward's gradcheck above checks
    that map against finite differences; the backward op has no derivative of its own)."""
    args = make_args(cell, seed=3, requires_grad=False, lengths=[4, 2, 3])
    results = torch.ops.rnnfast.forward(*args)
    output, h_n, _, _ = results
    cx = args[3]

    def grads(grad_output, grad_h_n, grad_c_n):
        result = torch.ops.rnnfast.backward(
            *backward_args(args, results, grad_output, grad_h_n, grad_c_n))
        return [t for t in result if t.numel()]

    one = [torch.randn_like(output), torch.randn_like(h_n),
           torch.randn_like(cx) if cx is not None else None]
    two = [torch.randn_like(output), torch.randn_like(h_n),
           torch.randn_like(cx) if cx is not None else None]
    combined = [None if a is None else 2 * a - 3 * b for a, b in zip(one, two)]
    for a, b, c in zip(grads(*one), grads(*two), grads(*combined)):
        torch.testing.assert_close(c, 2 * a - 3 * b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman_tanh"])
@pytest.mark.parametrize("variant", ["plain", "reverse", "lengths", "sorted_lengths"])
def test_backward_op_without_state_gradients(cell, variant, device):
    """state_grad=False: the gradients of hx and cx come back empty and every other gradient is
    bit for bit the one of state_grad=True."""
    args = make_args(cell, seed=11, requires_grad=False, device=device, **VARIANTS[variant])
    results = torch.ops.rnnfast.forward(*args)
    output, h_n, c_n, _ = results
    grads = (torch.randn_like(output), torch.randn_like(h_n),
             torch.randn_like(c_n) if c_n.numel() else None)
    call = backward_args(args, results, *grads)
    full = torch.ops.rnnfast.backward(*call)
    without = torch.ops.rnnfast.backward(*call, False, False)
    assert full[1].shape == args[2].shape and without[1].numel() == 0
    assert without[2].numel() == 0
    for index in (0, 3, 4, 5, 6, 7):
        assert torch.equal(without[index], full[index]), f"gradient {index} differs"
    torch.library.opcheck(torch.ops.rnnfast.backward.default, call + (False, False))


def _grad_output_layouts(grad):
    """The values of grad [T, B, P] in the layouts an incoming gradient comes in."""
    T, B, P = grad.shape
    batch_first = grad.transpose(0, 1).contiguous().transpose(0, 1)  # rows at strides (P, T * P)
    wide = torch.zeros(T, B, 2 * P, dtype=grad.dtype)
    wide[..., ::2] = grad
    return {"batch_first": batch_first, "strided_columns": wide[..., ::2],
            "broadcast_row": grad[0, 0].expand(T, B, P),  # output.sum()'s, times a row
            "broadcast_scalar": grad[0, 0, 0].expand(T, B, P)}


# Over 2^12 gradient values (the general reverse pass copies smaller ones contiguous whatever
# their layout), except the gate-packed view's, which reads its rows contiguous.
_LENGTHS = [8 - i % 8 for i in range(24)]
LAYOUT_CASES = [(cell, name, variant) for cell in ["lstm", "gru", "elman_tanh"]
                for name, variant in [("gate-packed", dict(hidden=3)),
                                      ("rows", dict(steps=8, batch=24, hidden=30)),
                                      ("reverse-lengths", dict(steps=8, batch=24, hidden=30,
                                                               reverse=True,
                                                               lengths=_LENGTHS))]]
LAYOUT_CASES.append(("lstm", "projection", dict(steps=8, batch=24, hidden=30, proj=25)))
# float32 layers small enough for the CPU's register layer, which reads any layout at any size.
LAYOUT_CASES += [(cell, "registers", dict(steps=40, batch=3, hidden=2, dtype=torch.float32))
                 for cell in ["lstm", "gru", "elman_tanh"]]


@pytest.mark.parametrize("cell,name,variant", LAYOUT_CASES,
                         ids=[f"{cell}-{name}" for cell, name, _ in LAYOUT_CASES])
def test_backward_op_reads_any_grad_output_layout(cell, name, variant):
    """Incoming output gradients that are views (a batch_first gradient, a broadcast one, one
    with a column stride) give the gradients of the same values made contiguous."""
    args = make_args(cell, seed=5, requires_grad=False, **variant)
    results = torch.ops.rnnfast.forward(*args)
    output = results[0]
    grad = torch.randn_like(output)
    for name, view in _grad_output_layouts(grad).items():
        expected = torch.ops.rnnfast.backward(
            *backward_args(args, results, view.contiguous(), None, None))
        actual = torch.ops.rnnfast.backward(*backward_args(args, results, view, None, None))
        for got, want in zip(actual, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def _input_layouts(x):
    """The values of x [T, B, I] in the layouts an input comes in."""
    T, B, I = x.shape
    wide = torch.zeros(T, B, 2 * I, dtype=x.dtype)
    wide[..., ::2] = x
    return {"batch_first": x.transpose(0, 1).contiguous().transpose(0, 1),
            "strided_columns": wide[..., ::2], "broadcast_steps": x[:1].expand(T, B, I)}


@pytest.mark.parametrize("name", ["registers", "general"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "elman_tanh"])
def test_any_input_layout_gives_the_contiguous_results(cell, name):
    """An input view (a batch_first input is a transposed one) gives exactly the outputs and
    gradients of its values made contiguous, in both passes, whether the engine reads it at
    its strides (the CPU's register layer) or copies it."""
    sizes = dict(steps=30, batch=3, input_size=2, hidden=2) if name == "registers" else \
        dict(steps=6, batch=5, input_size=7, hidden=9)
    args = make_args(cell, seed=9, dtype=torch.float32, **sizes)
    for layout, view in _input_layouts(args[1].detach()).items():
        results = {}
        for kind, x in (("view", view), ("contiguous", view.contiguous())):
            x = x.detach().requires_grad_()
            call = [args[0], x, *args[2:]]
            output, h_n, c_n, _ = torch.ops.rnnfast.forward(*call)
            loss = (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum() \
                + h_n.square().sum()
            tensors = [x] + [a for a in args[2:] if isinstance(a, torch.Tensor) and a.requires_grad]
            results[kind] = [output, h_n, *torch.autograd.grad(loss, tensors)]
        for got, want in zip(results["view"], results["contiguous"]):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=layout)


@pytest.mark.parametrize("variant", [dict(), dict(reverse=True, lengths=[4, 2, 3]),
                                     dict(bias=False)], ids=["plain", "packed", "nobias"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "elman_tanh", "elman_sigmoid"])
def test_opcheck_forward(cell, variant, device):
    args = make_args(cell, dtype=torch.float32, seed=11, device=device, **variant)
    torch.library.opcheck(torch.ops.rnnfast.forward.default, tuple(args))
    no_grad_args = make_args(cell, dtype=torch.float32, seed=12, requires_grad=False,
                             device=device, **variant)
    no_grad_args[-1] = False  # save_workspace=False: inference path
    torch.library.opcheck(torch.ops.rnnfast.forward.default, tuple(no_grad_args))


def test_opcheck_forward_projection(device):
    args = make_args("lstm", hidden=4, proj=3, dtype=torch.float32, seed=13, device=device)
    torch.library.opcheck(torch.ops.rnnfast.forward.default, tuple(args))


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman_relu"])
def test_opcheck_backward(cell, device):
    args = make_args(cell, dtype=torch.float32, seed=17, requires_grad=False,
                     lengths=[4, 3, 2], reverse=True, device=device)
    results = torch.ops.rnnfast.forward(*args)
    output, h_n, c_n, _ = results
    torch.library.opcheck(torch.ops.rnnfast.backward.default, backward_args(
        args, results, torch.randn_like(output), torch.randn_like(h_n),
        torch.randn_like(c_n) if c_n.numel() else None))


def _batch_first_args(args):
    """The same call with batch_first=True: the input as a [B, T, I] tensor of its own."""
    x = args[1].detach().transpose(0, 1).contiguous().requires_grad_(args[1].requires_grad)
    return [args[0], x, *args[2:], True]


@pytest.mark.parametrize("variant", [dict(), dict(reverse=True, lengths=[4, 2, 3]),
                                     dict(steps=30, batch=3, input_size=2, hidden=2)],
                         ids=["plain", "packed", "registers"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "elman_tanh"])
def test_batch_first_ops_are_the_time_major_ops_transposed(cell, variant, device):
    """batch_first=True takes input [B, T, I] and returns output and grad_input [B, T, ...]:
    exactly the time-major op's, transposed, through autograd and the backward op alike."""
    args = make_args(cell, dtype=torch.float32, seed=19, device=device, **variant)
    first = _batch_first_args(args)
    time_major = torch.ops.rnnfast.forward(*args)
    batch_first = torch.ops.rnnfast.forward(*first)
    torch.testing.assert_close(batch_first[0], time_major[0].transpose(0, 1), rtol=0, atol=0)
    for got, want in zip(batch_first[1:], time_major[1:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    weight = torch.linspace(-1, 1, time_major[0].numel(), device=device)
    leaves = [a for a in args[2:] if isinstance(a, torch.Tensor) and a.requires_grad]
    want = torch.autograd.grad((time_major[0] * weight.view_as(time_major[0])).sum(),
                               [args[1], *leaves])
    got = torch.autograd.grad(
        (batch_first[0].transpose(0, 1) * weight.view_as(time_major[0])).sum(),
        [first[1], *leaves])
    torch.testing.assert_close(got[0], want[0].transpose(0, 1), rtol=0, atol=0)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # The backward op called directly with batch_first=True.
    with torch.no_grad():
        grad = torch.randn_like(time_major[0])
        want = torch.ops.rnnfast.backward(*backward_args(args, time_major, grad, None, None))
        got = torch.ops.rnnfast.backward(
            *backward_args(first[:-1], batch_first, grad.transpose(0, 1), None, None), True)
    torch.testing.assert_close(got[0], want[0].transpose(0, 1), rtol=0, atol=0)
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman_relu"])
def test_opcheck_batch_first(cell, device):
    args = _batch_first_args(make_args(cell, dtype=torch.float32, seed=23, device=device,
                                       lengths=[4, 3, 2]))
    torch.library.opcheck(torch.ops.rnnfast.forward.default, tuple(args))
    args = _batch_first_args(make_args(cell, dtype=torch.float32, seed=23, device=device,
                                       lengths=[4, 3, 2], requires_grad=False))
    results = torch.ops.rnnfast.forward(*args)
    output, h_n, _, _ = results
    # The fake implementation gives the output the real one's layout (a time-major tensor's
    # transposed view), which opcheck does not compare. (A shape environment: with lengths
    # the workspace's rows are known once the engine has run.)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake = torch.ops.rnnfast.forward(
            *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    assert fake[0].shape == output.shape and fake[0].stride() == output.stride()
    torch.library.opcheck(torch.ops.rnnfast.backward.default, (
        *backward_args(args[:-1], results, torch.randn_like(output), torch.randn_like(h_n),
                       None), True))


def _module_pair(kind):
    torch.manual_seed(5)
    if kind == "lstm":
        return rnnfast.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    if kind == "lstm_proj":
        return rnnfast.LSTM(3, 4, proj_size=2, batch_first=True)
    if kind == "gru":
        return rnnfast.GRU(3, 4, num_layers=2, batch_first=True)
    return rnnfast.RNN(3, 4, nonlinearity="sigmoid", bidirectional=True)


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn"])
def test_compile_fullgraph_matches_eager(kind):
    torch._dynamo.reset()
    model = _module_pair(kind)
    x = torch.randn(2, 5, 3)

    def step(inputs):
        output, state = model(inputs)
        h = state[0] if isinstance(state, tuple) else state
        return output, h

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_out = step(x)
    eager_loss = eager_out[0].square().sum() + eager_out[1].sum()
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled_out = compiled(x)
    compiled_loss = compiled_out[0].square().sum() + compiled_out[1].sum()
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    for a, b in zip(compiled_out + compiled_grads, eager_out + eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn"])
def test_jit_trace_matches_eager(kind):
    # torch.jit.trace checks its trace by tracing again under no_grad; the traced module must
    # then give eager's outputs and, differentiated, eager's gradients, on a longer sequence.
    model = _module_pair(kind)
    batch_first = kind != "rnn"
    x_shape = (2, 5, 3) if batch_first else (5, 2, 3)
    with warnings.catch_warnings():
        # The modules' size checks compare sizes the tracer records as constants.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.randn(x_shape))
    x = torch.randn((2, 8, 3) if batch_first else (8, 2, 3))
    results = {}
    for name, module in (("eager", model), ("traced", traced)):
        output, state = module(x)
        h = state[0] if isinstance(state, tuple) else state
        loss = (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum() + h.sum()
        results[name] = [output, h, *torch.autograd.grad(loss, list(model.parameters()))]
        with torch.no_grad():
            results[name].append(module(x)[0])
    for a, b in zip(results["traced"], results["eager"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _torch_nn_twin(model):
    """torch.nn's module of the same configuration and parameters (float64), or None."""
    if type(model).__name__ == "RNN" and model.nonlinearity == "sigmoid":
        return None
    kw = dict(num_layers=model.num_layers, batch_first=model.batch_first,
              bidirectional=model.bidirectional)
    if type(model).__name__ == "LSTM":
        kw["proj_size"] = model.proj_size
    if type(model).__name__ == "RNN":
        kw["nonlinearity"] = model.nonlinearity
    twin = getattr(nn, type(model).__name__)(model.input_size, model.hidden_size, **kw).double()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn"])
def test_torch_func_grad_and_vmap(kind):
    model = _module_pair(kind).double()
    twin = _torch_nn_twin(model)
    x_shape = (2, 5, 3) if model.batch_first else (5, 2, 3)
    x = torch.randn(x_shape, dtype=torch.float64)
    weights = torch.randn(128, dtype=torch.float64)  # one per output element

    def loss(module):
        def f(params, inputs):
            output = torch.func.functional_call(module, params, (inputs,))[0]
            return (output * weights[:output.numel()].view_as(output)).sum()
        return f

    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(loss(model), argnums=(0, 1))(params, x)
    # Against eager autograd of the same module, and torch.nn's torch.func.grad where it has
    # the variant.
    eager_params = dict(model.named_parameters())
    x_leaf = x.clone().requires_grad_()
    eager = torch.autograd.grad(loss(model)(eager_params, x_leaf),
                                [*eager_params.values(), x_leaf])
    expected = [(dict(zip(eager_params, eager[:-1])), eager[-1])]
    if twin is not None:
        expected.append(torch.func.grad(loss(twin), argnums=(0, 1))(params, x))
    for want in expected:
        for k in params:
            torch.testing.assert_close(grads[0][k], want[0][k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads[1], want[1], rtol=1e-10, atol=1e-12)

    # Per-sample gradients: vmap over a batch of inputs equals a loop of grads.
    inputs = torch.randn(3, *x_shape, dtype=torch.float64)
    with warnings.catch_warnings():
        # functorch's loop over ops without a batching rule warns of its speed.
        warnings.simplefilter("ignore", UserWarning)
        per_sample = torch.func.vmap(torch.func.grad(loss(model)), in_dims=(None, 0))(
            params, inputs)
    for i in range(3):
        one = torch.func.grad(loss(model))(params, inputs[i])
        for k in params:
            torch.testing.assert_close(per_sample[k][i], one[k], rtol=1e-12, atol=1e-14)

    # Nested transforms and forward mode differentiate the ATen composition of the layer:
    # against eager double backward of the same module, and torch.nn's where it has the variant.
    def weight_hh_grad_sum(module):
        return lambda p: torch.func.grad(loss(module))(p, x)["weight_hh_l0"].sum()

    nested = torch.func.grad(weight_hh_grad_sum(model))(params)
    eager_first = torch.autograd.grad(loss(model)(eager_params, x), eager_params["weight_hh_l0"],
                                      create_graph=True)[0]
    eager_nested = torch.autograd.grad(eager_first.sum(), list(eager_params.values()),
                                       allow_unused=True)
    tangent = torch.randn_like(x)
    _, tangent_out = torch.func.jvp(lambda inputs: loss(model)(params, inputs), (x,), (tangent,))
    torch.testing.assert_close(tangent_out, (grads[1] * tangent).sum(), rtol=1e-10, atol=1e-12)
    for k, want in zip(eager_params, eager_nested):
        torch.testing.assert_close(nested[k], want if want is not None else torch.zeros_like(
            nested[k]), rtol=1e-10, atol=1e-12)
    if twin is not None:
        twin_nested = torch.func.grad(weight_hh_grad_sum(twin))(params)
        for k in params:
            torch.testing.assert_close(nested[k], twin_nested[k], rtol=1e-10, atol=1e-12)


def test_compile_inductor_fullgraph():
    torch._dynamo.reset()
    model = rnnfast.GRU(2, 3, batch_first=True)
    x = torch.randn(4, 6, 2)
    compiled = torch.compile(lambda v: model(v)[0].sum(), fullgraph=True)
    eager = model(x)[0].sum()
    result = compiled(x)
    torch.testing.assert_close(result, eager, rtol=1e-6, atol=1e-6)
    result.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


class _RecordingTensor(torch.Tensor):
    """A tensor subclass that records the functions its __torch_function__ is called for."""

    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs)


class _RecordingMode(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("how", ["subclass", "mode"])
def test_torch_function_sees_the_op_of_eager_calls(how):
    """Eager layers call the op from C++ (rnnfast._C.layer), not through torch.ops; a tensor
    subclass with __torch_function__, or a torch function mode, must still see the call and
    get the same results."""
    model = rnnfast.GRU(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    expected_output, expected_h = model(x)
    if how == "subclass":
        _RecordingTensor.seen.clear()
        output, h_n = model(x.as_subclass(_RecordingTensor))
        seen = _RecordingTensor.seen
        assert type(output) is _RecordingTensor
    else:
        with _RecordingMode() as mode:
            output, h_n = model(x)
        seen = mode.seen
    assert seen.count(torch.ops.rnnfast.forward.default) == 2
    torch.testing.assert_close(output.as_subclass(torch.Tensor), expected_output, rtol=0, atol=0)
    torch.testing.assert_close(h_n.as_subclass(torch.Tensor), expected_h, rtol=0, atol=0)


def test_functional_layer_names_an_argument_that_is_no_tensor():
    x, w_ih = torch.randn(3, 2, 4), torch.randn(6, 4)
    with pytest.raises(RuntimeError, match="w_hh"):
        rnnfast.functional.layer("gru", x, None, None, w_ih, "not a tensor")


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN])
def test_minimal_sizes(cls):
    reference_cls = {rnnfast.LSTM: torch.nn.LSTM, rnnfast.GRU: torch.nn.GRU,
                     rnnfast.RNN: torch.nn.RNN}[cls]
    torch.manual_seed(0)
    reference = reference_cls(1, 1).double()
    model = cls(1, 1).double()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 1, 1, dtype=torch.float64, requires_grad=True)
    out, _ = model(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    ref_out, _ = reference(x)
    (ref_grad,) = torch.autograd.grad(ref_out.sum(), x)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN])
def test_long_sequence(cls):
    """T = 20000 steps: no stack or size trouble, and the same numbers as torch.nn."""
    reference_cls = {rnnfast.LSTM: torch.nn.LSTM, rnnfast.GRU: torch.nn.GRU,
                     rnnfast.RNN: torch.nn.RNN}[cls]
    torch.manual_seed(1)
    reference = reference_cls(2, 3, batch_first=True).double()
    model = cls(2, 3, batch_first=True).double()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 20000, 2, dtype=torch.float64)
    out, _ = model(x)
    out.sum().backward()
    ref_out, _ = reference(x)
    ref_out.sum().backward()
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for p, q in zip(model.parameters(), reference.parameters()):
        scale = q.grad.abs().max()
        assert (p.grad - q.grad).abs().max() <= 1e-10 * scale


@pytest.mark.parametrize("variant", [dict(), dict(lengths=[4, 0, 2], reverse=True)],
                         ids=["plain", "lengths_reverse"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "elman_tanh"])
def test_zero_initial_state_is_zero_hx(cell, variant):
    """hx = cx = None runs as zero initial states: the same results and gradients as explicit
    zeros, and no gradient for the states that were not given."""
    args = make_args(cell, seed=21, **variant)
    zero_args = list(args)
    zero_args[2] = torch.zeros_like(args[2]).requires_grad_()
    if args[3] is not None:
        zero_args[3] = torch.zeros_like(args[3]).requires_grad_()
    none_args = list(args)
    none_args[2] = none_args[3] = None
    expected = differentiable_outputs(*zero_args)
    actual = differentiable_outputs(*none_args)
    weights = [torch.randn_like(t) for t in expected]
    parameters = [args[1], args[4], args[5], args[6], args[7]]
    expected_grads = torch.autograd.grad(
        sum((w * t).sum() for w, t in zip(weights, expected)), parameters)
    actual_grads = torch.autograd.grad(
        sum((w * t).sum() for w, t in zip(weights, actual)), parameters)
    for a, b in zip(actual + actual_grads, expected + expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in none_args]
    results = torch.ops.rnnfast.forward(*detached)
    grads = torch.ops.rnnfast.backward(*backward_args(
        detached, results, torch.randn_like(results[0]), None, None))
    assert grads[1].numel() == 0 and grads[2].numel() == 0


def test_inference_does_not_save_workspace():
    args = make_args("lstm", requires_grad=False)
    args[-1] = False
    *_, workspace = torch.ops.rnnfast.forward(*args)
    assert workspace.numel() == 0


def test_backward_without_workspace_is_refused():
    args = make_args("gru")
    args[-1] = False
    output, *_ = torch.ops.rnnfast.forward(*args)
    with pytest.raises(RuntimeError, match="save_workspace"):
        output.sum().backward()


def test_graph_is_freed_after_backward_unless_retained():
    model = rnnfast.GRU(2, 3).double()
    x = torch.randn(5, 2, 2, dtype=torch.float64, requires_grad=True)
    loss = model(x)[0].square().sum()
    first = torch.autograd.grad(loss, [x, model.weight_hh_l0], retain_graph=True)
    second = torch.autograd.grad(loss, [x, model.weight_hh_l0])
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


@pytest.mark.parametrize("sizes", [dict(T=40, B=3, I=2, H=2), dict(T=6, B=5, I=7, H=9)],
                         ids=["registers", "general"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
def test_input_changed_in_place_after_the_forward(sizes, batch_first):
    """An input changed in place between the passes: the backward refuses it (autograd's version
    error) or gives the gradients of the values the forward saw, never a mix."""
    T, B, I, H = sizes["T"], sizes["B"], sizes["I"], sizes["H"]
    model = rnnfast.LSTM(I, H, batch_first=batch_first)
    x = torch.randn((B, T, I) if batch_first else (T, B, I))
    output, _ = model(x)
    expected = torch.autograd.grad(output.square().sum(), model.weight_ih_l0)[0]
    output, _ = model(x)
    with torch.no_grad():
        x.mul_(2.0)
    try:
        got = torch.autograd.grad(output.square().sum(), model.weight_ih_l0)[0]
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
def test_weight_changed_in_place_after_the_forward_is_refused(batch_first):
    """The backward reads the weights saved by the forward: changing one in place in between
    must raise autograd's version error, not give gradients of other values."""
    model = rnnfast.RNN(2, 3, batch_first=batch_first)
    output, _ = model(torch.randn(4, 1, 2))
    loss = output.sum()
    with torch.no_grad():
        model.weight_hh_l0.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "time_major"])
def test_output_changed_in_place_after_the_forward(batch_first):
    """The output changed in place between the passes (torch.nn's RNN allows it): the backward
    computes the output again from the saved inputs and gives the gradients of the values the
    forward returned, not of the changed ones."""
    model = rnnfast.RNN(2, 3, batch_first=batch_first)
    x = torch.randn(4, 1, 2)
    weights = torch.randn(4, 1, 3)  # a loss whose backward reads no saved output
    output, _ = model(x)
    expected = torch.autograd.grad((output * weights).sum(), model.weight_hh_l0)[0]
    output, _ = model(x)
    loss = (output * weights).sum()
    with torch.no_grad():
        output.add_(1.0)
    got = torch.autograd.grad(loss, model.weight_hh_l0)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(0, "lstm_tanh"), "cell must be one of"),
    (lambda a: a.__setitem__(1, a[1][0]), "input must be 3-D"),
    (lambda a: a.__setitem__(1, a[1][..., :1]), "input_size"),
    (lambda a: a.__setitem__(2, a[2][:1]), "hx must have shape"),
    (lambda a: a.__setitem__(3, a[3][:, :1]), "cx must have shape"),
    (lambda a: a.__setitem__(3, None), "cx .* is required"),
    (lambda a: a.__setitem__(2, None), "cx must be None when hx is None"),
    (lambda a: a.__setitem__(4, a[4].float()), "w_ih must have the dtype of input"),
    (lambda a: a.__setitem__(5, a[5][:, :1]), "w_hh must have shape"),
    (lambda a: a.__setitem__(6, None), "b_ih and b_hh"),
    (lambda a: a.__setitem__(8, torch.zeros(5, 3, dtype=torch.float64)), "w_hr"),
    (lambda a: a.__setitem__(9, torch.tensor([4, 5, 1])), r"lengths must lie in \[0, T = 4\]"),
    (lambda a: a.__setitem__(9, torch.tensor([4, -1, 1])), "lengths must lie"),
    (lambda a: a.__setitem__(9, torch.tensor([4, 2])), "lengths must have shape"),
    (lambda a: a.__setitem__(9, torch.tensor([4.0, 2.0, 1.0])), "lengths must be int64"),
], ids=["cell", "rank", "input_size", "hx", "cx", "cx-missing", "cx-without-hx", "dtype",
        "w_hh", "bias", "w_hr", "lengths-range", "lengths-negative", "lengths-size",
        "lengths-dtype"])
def test_op_argument_errors(change, match):
    args = make_args("lstm", requires_grad=False)
    change(args)
    with pytest.raises((RuntimeError, ValueError), match=match):
        torch.ops.rnnfast.forward(*args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN])
@pytest.mark.parametrize("batch,hidden", [(3, 16), (5, 4), (20, 160), (64, 256)],
                         ids=["tiled", "gate-packed", "blas", "aten"])
def test_half_precision_on_cpu(cls, dtype, batch, hidden):
    """bfloat16 / float16 storage with float accumulation: outputs and gradients within a few
    units of the dtype's rounding of a float64 run of the same weights. The sizes take the
    per-step products' kernels: in float the tiled kernel, the gate-packed layout of a few
    units, the BLAS with the batch split over the threads; ATen's GEMM of the dtype for the
    largest."""
    torch.manual_seed(3)
    model = cls(8, hidden, num_layers=2, bidirectional=True)
    reference = cls(8, hidden, num_layers=2, bidirectional=True).double()
    reference.load_state_dict(model.state_dict())
    model = model.to(dtype)
    x = torch.randn(5, batch, 8)
    out = model(x.to(dtype))[0]
    out.float().sum().backward()
    expected = reference(x.double())[0]
    expected.sum().backward()
    limit = 4 * torch.finfo(dtype).eps
    assert (out.double() - expected).abs().max() <= limit * expected.abs().max()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.grad.dtype == dtype
        assert (p.grad.double() - q.grad).abs().max() <= 2 * limit * q.grad.abs().max()


@pytest.mark.skipif(not (_ops._C.cpu_amx() or runs_bf16_dot_products()),
                    reason="this CPU runs neither AMX tiles nor AVX512-BF16 dot products")
@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN])
@pytest.mark.parametrize("batch,hidden,packed", [(1, 512, False), (3, 100, False),
                                                 (37, 100, False), (20, 160, True)],
                         ids=["one-row", "dot-rows", "row-tiles", "packed"])
def test_bfloat16_products_on_amx_tiles_or_dot_products(cls, batch, hidden, packed, monkeypatch):
    """bfloat16 per-step products on AMX tiles, or without them as AVX512-BF16 dot products
    (csrc/cpu/amx_product.h), forward and backward: outputs and gradients within a few units of
    bfloat16's rounding of a float64 run on the same rounded values, as the float products'
    (RNNFAST_CPU_AMX=0) are. The sizes take the dot products of fewer than 4 rows (one row of 512
    units, whose outputs split over the threads; 3 rows of 100 units: a pair and one alone),
    tiles of 16 rows and a last one of 5 (37 rows of 100 units; without tiles, pairs of rows and
    one alone), terms that do not fill the last chunk of 32 (100 units), and batches that shrink
    as a packed sequence's rows end; 20 and 37 rows split their rows over the threads, and every
    split gives the results of one thread."""
    torch.manual_seed(5)
    dtype, steps = torch.bfloat16, 16  # (the dot products run in calls of 16 steps or more)
    model = cls(8, hidden, bidirectional=True).to(dtype)
    reference = cls(8, hidden, bidirectional=True).double()
    reference.load_state_dict({name: value.double() for name, value in model.state_dict().items()})
    x = torch.randn(steps, batch, 8).to(dtype)
    grad = torch.randn(steps, batch, 2 * hidden).to(dtype)
    lengths = torch.randint(1, steps + 1, (batch,)).sort(descending=True).values
    lengths[0] = steps

    def run(module, values, grad_values):
        module.zero_grad()
        if packed:
            out, _ = nn.utils.rnn.pad_packed_sequence(
                module(nn.utils.rnn.pack_padded_sequence(values, lengths))[0])
        else:
            out = module(values)[0]
        (out * grad_values).sum().backward()
        return out.detach(), [p.grad.clone() for p in module.parameters()]

    expected, expected_grads = run(reference, x.double(), grad.double())
    limit = 4 * torch.finfo(dtype).eps
    for amx in ("1", "0"):
        monkeypatch.setenv("RNNFAST_CPU_AMX", amx)
        out, grads = run(model, x, grad)
        assert (out.double() - expected).abs().max() <= limit * expected.abs().max()
        for got, want in zip(grads, expected_grads):
            assert got.dtype == dtype
            assert (got.double() - want).abs().max() <= 2 * limit * want.abs().max()
    monkeypatch.setenv("RNNFAST_CPU_AMX", "1")
    with torch_threads(2):
        two_threads = run(model, x, grad)
    with torch_threads(1):
        one_thread = run(model, x, grad)
    for got, want in zip([two_threads[0], *two_threads[1]], [one_thread[0], *one_thread[1]]):
        assert torch.equal(got, want)


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU])
@pytest.mark.parametrize("input_size, hidden", [(16, 32), (512, 4)],
                         ids=["one-product", "chunks-added-in-double"])
def test_half_precision_weight_gradients_over_packed_rows(cls, input_size, hidden):
    """bfloat16 weight gradients over a packed sequence's rows, gathered from the padded
    layout: one product over all rows, or (where the rows outweigh a double total of the
    gradient: about 2,500 rows of 512 inputs for 4 units) products of chunks of rows added in double.
    Within a few units of bfloat16's rounding of a float64 run on the same rounded values."""
    torch.manual_seed(4)
    dtype, steps, batch = torch.bfloat16, 50, 64
    model = cls(input_size, hidden).to(dtype)
    reference = cls(input_size, hidden).double()
    reference.load_state_dict({name: value.double() for name, value in model.state_dict().items()})
    lengths = torch.randint(30, steps + 1, (batch,)).sort(descending=True).values
    lengths[0] = steps
    x = torch.randn(steps, batch, input_size).to(dtype)
    grad = torch.randn(steps, batch, hidden).to(dtype)

    def run(module, values, grad_values):
        packed = nn.utils.rnn.pack_padded_sequence(values, lengths)
        out, _ = nn.utils.rnn.pad_packed_sequence(module(packed)[0])
        (out * grad_values).sum().backward()
        return out

    out = run(model, x, grad)
    expected = run(reference, x.double(), grad.double())
    limit = 4 * torch.finfo(dtype).eps
    assert (out.double() - expected).abs().max() <= limit * expected.abs().max()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert p.grad.dtype == dtype
        assert (p.grad.double() - q.grad).abs().max() <= 2 * limit * q.grad.abs().max()


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman_tanh"])
@pytest.mark.parametrize("lengths", [None, [5, 3, 2]], ids=["full", "lengths"])
@pytest.mark.parametrize("hidden", [6, 40], ids=["gate-packed", "rows"])
def test_saved_output_shared_with_the_concatenation(cell, lengths, hidden):
    """A bidirectional stack's graph nodes may save views of the directions' concatenation in
    place of their own outputs (functional._next_layer_input): the gradients are those of the
    unshared graph, and the views are saved as the concatenation's, so that where it is changed
    in place before the backward (torch.nn's bidirectional layers allow it) the nodes compute
    their outputs again, and the gradients stay those of the values the forward returned."""
    torch.manual_seed(0)
    T, B, I, H = 5, 3, 4, hidden
    gates = _ops.GATES[cell]
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    weights = [[torch.randn(gates * H, n, dtype=torch.float64, requires_grad=True)
                for n in (I, H)] for _ in range(2)]
    lengths = torch.tensor(lengths) if lengths is not None else None

    def concatenation(share):
        outputs = [rnnfast.functional.layer(cell, x, None, None, w_ih, w_hh, lengths=lengths,
                                            reverse=direction == 1)[0]
                   for direction, (w_ih, w_hh) in enumerate(weights)]
        both = torch.cat(outputs, dim=2)
        if share:
            for direction, out in enumerate(outputs):
                assert _ops._C.share_saved_output(out, both.narrow(2, direction * H, H))
        # The concatenation is no layer's output: nothing to share.
        assert not _ops._C.share_saved_output(both, both)
        return both

    grad = torch.randn(T, B, 2 * H, dtype=torch.float64)
    leaves = [x] + [w for pair in weights for w in pair]
    expected = torch.autograd.grad(concatenation(False), leaves, grad)
    got = torch.autograd.grad(concatenation(True), leaves, grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    both = concatenation(True)
    with torch.no_grad():
        both.add_(1.0)
    got = torch.autograd.grad(both, leaves, grad)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_packed_sequence_workspace_holds_the_active_rows(cell):
    """With lengths the workspace is [rows, W]: by decreasing length (a packed sequence's order)
    the CPU engine saves the rows that are active at each step only; in any other order, or
    with a projection (whose weight gradient reads all rows), all T * B rows."""
    T, B = 5, 4
    cases = [([5, 4, 2, 0], 0, 11), ([2, 5, 4, 0], 0, T * B), ([5, 4, 2, 0], 2, T * B)]
    for lengths, proj, rows in cases:
        if proj and cell != "lstm":
            continue
        args = make_args(cell, steps=T, batch=B, hidden=3, proj=proj, lengths=lengths)
        results = torch.ops.rnnfast.forward(*args)
        width = _ops.workspace_width(cell, 3, proj > 0)
        assert results[3].shape == (rows, width), (lengths, proj)
    # The backward refuses a workspace of other rows than its forward saved.
    args = make_args(cell, steps=T, batch=B, hidden=3, lengths=[5, 4, 2, 0],
                     requires_grad=False)
    results = list(torch.ops.rnnfast.forward(*args))
    output, h_n = results[0], results[1]
    results[3] = torch.zeros(12, results[3].size(1), dtype=results[3].dtype)
    with pytest.raises(RuntimeError, match="or the sum of the lengths"):
        torch.ops.rnnfast.backward(*backward_args(args, results, torch.randn_like(output),
                                                  torch.randn_like(h_n), None))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("lengths", [None, [6, 5, 5, 2], [2, 6, 0, 5]],
                         ids=["full", "sorted-lengths", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gate_gradients_over_the_workspace(cell, lengths, reverse):
    """A backward that releases the graph writes the gate gradients over the workspace (where
    nothing else holds it); one that retains the graph, or whose workspace the caller holds,
    leaves the workspace as it was. All give the same gradients."""
    torch.manual_seed(0)
    T, B, I, H = 6, 4, 5, 9  # H past a vector's lanes: no gate-packed view, which keeps its own
    gates = _ops.GATES[cell]
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(B, H, dtype=torch.float64, requires_grad=True)
    cx = torch.randn(B, H, dtype=torch.float64, requires_grad=True) if cell == "lstm" else None
    # w_ih, w_hh, b_ih, b_hh
    weights = [torch.randn(shape, dtype=torch.float64, requires_grad=True)
               for shape in ((gates * H, I), (gates * H, H), (gates * H,), (gates * H,))]
    lengths = torch.tensor(lengths) if lengths is not None else None
    leaves = [x, hx] + ([cx] if cx is not None else []) + weights
    grad = torch.randn(T, B, H, dtype=torch.float64)

    def gradients(retain):
        output, h_n, _ = rnnfast.functional.layer(cell, x, hx, cx, *weights, lengths=lengths,
                                                  reverse=reverse)
        loss = (output * grad).sum() + h_n.square().sum()
        return torch.autograd.grad(loss, leaves, retain_graph=retain)

    expected = gradients(retain=True)
    for a, b in zip(gradients(retain=False), expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # The op called as it is: the caller holds the workspace, which the backward leaves alone.
    output, h_n, _, workspace = torch.ops.rnnfast.forward(
        cell, x, hx, cx, *weights, None, lengths, reverse, True)
    saved = workspace.clone()
    loss = (output * grad).sum() + h_n.square().sum()
    for a, b in zip(torch.autograd.grad(loss, leaves), expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(workspace, saved)
