"""rnnfast's CUDA engine (csrc/cuda) on a GPU.

* the modules on CUDA against torch.nn on CUDA (cuDNN) and against rnnfast on the CPU, for
  every cell, with layers, bidirectional, projection, packed, unbatched, no-bias inputs and
  more batch rows than multiprocessors: outputs, final states and the gradients of the input,
  the initial states and every parameter, ||a - b||_inf / ||b||_inf <= 1e-10 (float64), and
  each float32 result within 1e-5 of the float64 truth, TF32 off;
* each of those, the gradchecks and the low-precision checks on each of the engine's paths:
  the sequence kernels, the GEMM-per-step loop (RNNFAST_SEQUENCE_KERNELS=0), the persistent
  kernels (RNNFAST_CUDA_PERSISTENT=1) and the warp kernels (RNNFAST_CUDA_WARP_KERNELS=1);
* gradcheck (float64, CUDA) of the forward op (whose gradient is the backward op) and of the
  backward op as a function of the incoming gradients (torch.library.opcheck on CUDA is
  tests/test_ops.py's, on each device);
* torch.compile(mode="reduce-overhead") (CUDA graphs), forward and backward, equals eager;
* float16 / bfloat16: rnnfast's error against a float64 reference is no worse than a small
  multiple of torch.nn's own error in the same dtype;
* autocast: under torch.autocast("cuda", dtype=torch.float16) rnnfast gives float16 outputs
  like torch.nn does (under bfloat16 autocast rnnfast gives bfloat16, where torch.nn's cuDNN
  RNNs give float16), and gradients flow back to the float32 parameters.

Where torch.cuda.is_available() is False nothing here is collected: the file reports one skip
that says so.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the CUDA tests (this file and the cuda parameters and tests "
                "of the others) are not collected", allow_module_level=True)
pytestmark = pytest.mark.cuda

import op_args  # noqa: E402
import rnnfast  # noqa: E402
from cuda_engine_paths import ENGINE_PATHS  # noqa: E402
from op_args import VARIANTS, backward_args, differentiable_outputs  # noqa: E402

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]

# cell name -> (rnnfast constructor, torch.nn constructor or None), both (input, hidden, **kw).
CELLS = {
    "lstm": (lambda i, h, **kw: rnnfast.LSTM(i, h, **kw), lambda i, h, **kw: nn.LSTM(i, h, **kw)),
    "lstm_relu": (lambda i, h, **kw: rnnfast.LSTM(i, h, activation="relu", **kw), None),
    "lstm_sigmoid": (lambda i, h, **kw: rnnfast.LSTM(i, h, activation="sigmoid", **kw), None),
    "gru": (lambda i, h, **kw: rnnfast.GRU(i, h, **kw), lambda i, h, **kw: nn.GRU(i, h, **kw)),
    "elman_tanh": (lambda i, h, **kw: rnnfast.RNN(i, h, nonlinearity="tanh", **kw),
                 lambda i, h, **kw: nn.RNN(i, h, nonlinearity="tanh", **kw)),
    "elman_relu": (lambda i, h, **kw: rnnfast.RNN(i, h, nonlinearity="relu", **kw),
                 lambda i, h, **kw: nn.RNN(i, h, nonlinearity="relu", **kw)),
    "elman_sigmoid": (lambda i, h, **kw: rnnfast.RNN(i, h, nonlinearity="sigmoid", **kw), None),
}

# Layer configurations: constructor keywords plus how the input is given.
CONFIGS = {
    "plain": dict(kw=dict()),
    "stacked_bi": dict(kw=dict(num_layers=2, bidirectional=True, batch_first=True)),
    "nobias_hx": dict(kw=dict(bias=False, num_layers=2), hx=True),
    "proj": dict(kw=dict(proj_size=3, num_layers=2, bidirectional=True), hx=True, lstm_only=True),
    "packed": dict(kw=dict(bidirectional=True, num_layers=2), packed=True, hx=True),
    "packed_proj": dict(kw=dict(proj_size=5, bidirectional=True), packed=True, lstm_only=True),
    "unbatched": dict(kw=dict(num_layers=2), unbatched=True, hx=True),
    "large": dict(kw=dict(), sizes=(37, 33, 19, 130)),
    # more rows than multiprocessors: a sequence kernel's blocks hold several rows each
    "many_rows": dict(kw=dict(bidirectional=True), sizes=(6, 300, 5, 16)),
}


@pytest.fixture(params=list(ENGINE_PATHS))
def engine_path(request, monkeypatch):
    for variable, value in ENGINE_PATHS[request.param].items():
        monkeypatch.setenv(variable, value)
    return request.param

STEPS, BATCH, INPUT, HIDDEN = 7, 5, 4, 8


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 GEMMs in cuBLAS and cuDNN, restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def rel_err(actual, expected):
    """||actual - expected||_inf / ||expected||_inf, in float64 on the CPU (0 for all-zero)."""
    a = actual.detach().to(CPU, torch.float64)
    b = expected.detach().to(CPU, torch.float64)
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if b.numel() == 0:
        return 0.0
    err = (a - b).abs().max().item()
    scale = b.abs().max().item()
    return err if scale == 0 else err / scale


def assert_results_close(actual, expected, tol, label):
    assert sorted(actual) == sorted(expected), f"{label}: {sorted(actual)} vs {sorted(expected)}"
    for key in expected:
        if expected[key] is None:
            assert actual[key] is None, f"{label}{key}: expected None"
            continue
        assert actual[key].dtype == expected[key].dtype, f"{label}{key}: dtype"
        assert torch.isfinite(expected[key]).all(), f"{label}{key}: reference not finite"
        err = rel_err(actual[key], expected[key])
        assert err <= tol, f"{label}{key}: relative error {err:.3e} > {tol:.0e}"


def make_case(cell, config, dtype, seed=0):
    """The rnnfast module (float32 parameters on the CPU, converted to `dtype`), the matching
    torch.nn module (or None) and the call: input, hx, lengths, batch_first, unbatched."""
    spec = CONFIGS[config]
    steps, batch, input_size, hidden = spec.get("sizes", (STEPS, BATCH, INPUT, HIDDEN))
    make_ours, make_theirs = CELLS[cell]
    torch.manual_seed(seed)
    ours = make_ours(input_size, hidden, **spec["kw"]).to(dtype)
    theirs = None
    if make_theirs is not None:
        theirs = make_theirs(input_size, hidden, **spec["kw"]).to(dtype)
        theirs.load_state_dict(ours.state_dict())
    generator = torch.Generator().manual_seed(seed + 1)
    batch_first = spec["kw"].get("batch_first", False)
    unbatched = spec.get("unbatched", False)
    shape = (steps, input_size) if unbatched else (
        (batch, steps, input_size) if batch_first else (steps, batch, input_size))
    x = torch.randn(*shape, generator=generator).to(dtype)
    hx = None
    if spec.get("hx"):
        layers = ours.num_layers * (2 if ours.bidirectional else 1)
        state = ours.proj_size or hidden
        h_shape = (layers, state) if unbatched else (layers, batch, state)
        c_shape = (layers, hidden) if unbatched else (layers, batch, hidden)
        h0 = torch.randn(*h_shape, generator=generator).to(dtype)
        hx = (h0, torch.randn(*c_shape, generator=generator).to(dtype)) if cell.startswith(
            "lstm") else h0
    lengths = None
    if spec.get("packed"):
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        lengths[0] = steps  # pad_packed_sequence's total_length keeps the shapes equal anyway
    return ours, theirs, dict(x=x, hx=hx, lengths=lengths, batch_first=batch_first)


def run(module, device, x, hx, lengths, batch_first, seed=123):
    """Outputs, final states and gradients of a weighted sum of all of them, by name."""
    module = module.to(device)
    x = x.detach().to(device).requires_grad_()
    leaves = [x]
    if hx is None:
        state = None
    elif isinstance(hx, tuple):
        state = tuple(t.detach().to(device).requires_grad_() for t in hx)
        leaves += list(state)
    else:
        state = hx.detach().to(device).requires_grad_()
        leaves.append(state)
    sequence = x
    if lengths is not None:
        sequence = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out, final = module(sequence, state)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, batch_first=batch_first,
                                     total_length=x.shape[1 if batch_first else 0])
    h_n, c_n = final if isinstance(final, tuple) else (final, None)
    generator = torch.Generator().manual_seed(seed)

    def weights(t):
        return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device, t.dtype)

    loss = (out * weights(out)).sum() + (h_n * weights(h_n)).sum()
    if c_n is not None:
        loss = loss + (c_n * weights(c_n)).sum()
    names = [name for name, _ in module.named_parameters()]
    grads = torch.autograd.grad(loss, leaves + [p for _, p in module.named_parameters()])
    result = dict(output=out, h_n=h_n, c_n=c_n, grad_input=grads[0])
    for name, grad in zip(["grad_h0", "grad_c0"][: len(leaves) - 1], grads[1:len(leaves)]):
        result[name] = grad
    for name, grad in zip(names, grads[len(leaves):]):
        result["grad_" + name] = grad
    return {k: (v.detach() if v is not None else None) for k, v in result.items()}


def cases():
    for cell in CELLS:
        for config, spec in CONFIGS.items():
            if spec.get("lstm_only") and not cell.startswith("lstm"):
                continue
            yield pytest.param(cell, config, id=f"{cell}-{config}")


def test_extension_has_cuda_engine():
    from rnnfast._ops import _C

    assert getattr(_C, "with_cuda", 0) == 1, (
        "rnnfast._C was built without the CUDA engine although CUDA is available: rebuild with "
        "`pip install -e . --no-build-isolation` where torch has CUDA and nvcc is found")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell, config", list(cases()))
def test_module_matches_torch_nn_and_cpu(cell, config, dtype, engine_path):
    """float64: rnnfast on CUDA equals rnnfast on the CPU and torch.nn (cuDNN) to 1e-10.
    float32: engines that sum in different orders (cuBLAS, cuDNN, the CPU's GEMMs) can each be
    near 1e-5 of the exact result and differ from each other by more (cuDNN's own float32
    results are up to 1.4e-5 off on these cases), so rnnfast's float32 results, on the GPU and
    on the CPU, are held to 1e-5 of the float64 truth: rnnfast on the CPU in float64, itself
    equal to torch.nn to 1e-10 (test_modules.py and the float64 case here)."""
    ours, theirs, call = make_case(cell, config, dtype)
    if dtype == torch.float64:
        cpu = run(ours, CPU, **call)
        gpu = run(ours, CUDA, **call)
        assert_on_cuda(gpu)
        assert_results_close(gpu, cpu, TOL[dtype], f"{cell}/{config} cuda vs rnnfast cpu: ")
        if theirs is not None:
            expected = run(theirs, CUDA, **call)
            assert_results_close(gpu, expected, TOL[dtype], f"{cell}/{config} cuda vs torch.nn: ")
        return
    call64 = {key: (value.double() if torch.is_tensor(value) and value.is_floating_point()
                    else tuple(v.double() for v in value) if isinstance(value, tuple)
                    else value) for key, value in call.items()}
    truth = as_dtype(run(copy.deepcopy(ours).double(), CPU, **call64), dtype)
    cpu = run(ours, CPU, **call)
    gpu = run(ours, CUDA, **call)
    assert_on_cuda(gpu)
    assert_results_close(gpu, truth, TOL[dtype], f"{cell}/{config} cuda vs float64: ")
    assert_results_close(cpu, truth, TOL[dtype], f"{cell}/{config} cpu vs float64: ")


def assert_on_cuda(result):
    for value in result.values():
        assert value is None or value.device.type == CUDA.type


def as_dtype(result, dtype):
    return {k: (v.to(dtype) if v is not None else None) for k, v in result.items()}


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN])
def test_cells_and_inference_on_cuda(cls):
    """No-grad forward (no workspace saved) equals the training forward, on a side stream."""
    torch.manual_seed(3)
    model = cls(6, 10, num_layers=2).to(CUDA)
    x = torch.randn(9, 4, 6, device=CUDA)
    with torch.no_grad():
        expected, _ = model(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        actual, _ = model(x)
        trained, _ = model(x.requires_grad_())
    torch.cuda.current_stream().wait_stream(stream)
    # Same computation; a tolerance only because cuBLAS may pick other kernels per stream.
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(trained.detach(), expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# The ops: gradcheck on CUDA
# ------------------------------------------------------------------------------------------

OP_CELLS = list(CELLS)


def make_args(cell, **kw):
    """op_args.make_args on CUDA."""
    return op_args.make_args(cell, device=CUDA, **kw)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("cell", OP_CELLS)
def test_gradcheck_forward_cuda(cell, variant, engine_path):
    args = make_args(cell, seed=len(cell) * 10 + len(variant), **VARIANTS[variant])
    assert torch.autograd.gradcheck(differentiable_outputs, tuple(args))


@pytest.mark.parametrize("variant", ["plain", "lengths_reverse"])
def test_gradcheck_projection_cuda(variant, engine_path):
    args = make_args("lstm", hidden=4, proj=2, seed=7, **VARIANTS[variant])
    assert torch.autograd.gradcheck(differentiable_outputs, tuple(args))


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman_tanh"])
def test_gradcheck_backward_op_cuda(cell, engine_path):
    """The backward op as a function of the incoming gradients (it is linear in them), with
    the forward's results as constants."""
    args = make_args(cell, seed=3, requires_grad=False, lengths=[4, 2, 3])
    results = torch.ops.rnnfast.forward(*args)
    output, h_n, c_n, workspace = results
    cx = args[3]

    def grads(grad_output, grad_h_n, *grad_c_n):
        result = torch.ops.rnnfast.backward(*backward_args(
            args, results, grad_output, grad_h_n, grad_c_n[0] if grad_c_n else None))
        return tuple(t for t in result if t.numel())

    incoming = [torch.randn_like(output), torch.randn_like(h_n)]
    if cx is not None:
        incoming.append(torch.randn_like(cx))
    a = grads(*incoming)
    b = grads(*(2 * t for t in incoming))
    for x, y in zip(a, b):
        assert x.device.type == CUDA.type
        torch.testing.assert_close(2 * x, y, rtol=1e-12, atol=1e-12)
    # And against the same op on the CPU.
    cpu_args = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args]
    cpu_out = torch.ops.rnnfast.forward(*cpu_args)
    for ours, theirs in zip((output, h_n, c_n), cpu_out[:3]):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-12, atol=1e-12)
    # Only the workspace's shape is shared: its layout is each engine's own.
    assert workspace.shape == cpu_out[3].shape
    cpu_grads = torch.ops.rnnfast.backward(*backward_args(
        cpu_args, cpu_out, incoming[0].cpu(), incoming[1].cpu(),
        incoming[2].cpu() if cx is not None else None))
    for ours, theirs in zip(a, [t for t in cpu_grads if t.numel()]):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------
# torch.compile with CUDA graphs
# ------------------------------------------------------------------------------------------

def _compile_model(kind):
    torch.manual_seed(5)
    if kind == "lstm":
        return rnnfast.LSTM(3, 8, num_layers=2, bidirectional=True, batch_first=True)
    if kind == "lstm_proj":
        return rnnfast.LSTM(3, 8, proj_size=4, batch_first=True)
    if kind == "gru":
        return rnnfast.GRU(3, 8, num_layers=2, batch_first=True)
    return rnnfast.RNN(3, 8, nonlinearity="sigmoid", bidirectional=True)


@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn"])
def test_compile_reduce_overhead_matches_eager(kind):
    torch._dynamo.reset()
    model = _compile_model(kind).to(CUDA)
    params = list(model.parameters())

    def step(inputs):
        output, state = model(inputs)
        h = state[0] if isinstance(state, tuple) else state
        return output, h

    compiled = torch.compile(step, mode="reduce-overhead")
    batch_first = getattr(model, "batch_first", False)
    for iteration in range(4):  # warm-up, recording, then replays of the CUDA graphs
        x = torch.randn((2, 5, 3) if batch_first else (5, 2, 3), device=CUDA)
        eager_out, eager_h = step(x)
        eager_loss = eager_out.square().sum() + eager_h.sum()
        eager_grads = torch.autograd.grad(eager_loss, params)
        torch.compiler.cudagraph_mark_step_begin()
        out, h = compiled(x)
        loss = out.square().sum() + h.sum()
        grads = torch.autograd.grad(loss, params)
        actual = [t.detach().clone() for t in (out, h, *grads)]
        expected = [t.detach() for t in (eager_out, eager_h, *eager_grads)]
        for a, b in zip(actual, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"iteration {iteration}: {m}")


# ------------------------------------------------------------------------------------------
# float16 / bfloat16
# ------------------------------------------------------------------------------------------

LOW = [pytest.param(torch.float16, id="f16"), pytest.param(torch.bfloat16, id="bf16")]
LOW_CASES = [("lstm", "stacked_bi"), ("lstm", "proj"), ("lstm", "packed"), ("gru", "stacked_bi"),
             ("gru", "packed"), ("elman_tanh", "nobias_hx"), ("elman_relu", "plain"),
             ("lstm", "large"), ("gru", "large")]
# rnnfast's relative error may be this many times torch.nn's own (each against float64), plus
# this many units of the dtype's epsilon (for quantities torch.nn happens to get very close).
LOW_FACTOR, LOW_EPS = 4.0, 4.0


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("cell, config", LOW_CASES, ids=[f"{c}-{k}" for c, k in LOW_CASES])
def test_low_precision_as_accurate_as_torch_nn(cell, config, dtype, engine_path):
    ours, theirs, call = make_case(cell, config, dtype)
    # The reference: torch.nn in float64 with the same (already rounded) weights and inputs.
    reference = CELLS[cell][1](ours.input_size, ours.hidden_size, **CONFIGS[config]["kw"])
    reference.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    reference = reference.double()
    call64 = dict(call)
    call64["x"] = call["x"].double()
    if call["hx"] is not None:
        call64["hx"] = (tuple(t.double() for t in call["hx"]) if isinstance(call["hx"], tuple)
                        else call["hx"].double())
    expected = run(reference, CUDA, **call64)
    ours_result = run(ours, CUDA, **call)
    try:
        theirs_result = run(theirs, CUDA, **call)
    except RuntimeError as error:  # e.g. a cuDNN without this dtype: nothing to compare with
        pytest.skip(f"torch.nn's {cell} does not run in {dtype} here: {error}")
    eps = torch.finfo(dtype).eps
    report = []
    for key, value in expected.items():
        if value is None:
            continue
        assert ours_result[key].dtype == dtype
        assert torch.isfinite(ours_result[key]).all(), f"{key}: not finite"
        ours_err = rel_err(ours_result[key], value)
        theirs_err = rel_err(theirs_result[key], value)
        report.append(f"{key}: rnnfast {ours_err:.2e} torch.nn {theirs_err:.2e}")
        assert ours_err <= LOW_FACTOR * theirs_err + LOW_EPS * eps, "\n".join(report)


# ------------------------------------------------------------------------------------------
# Autocast
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn"])
def test_autocast_like_torch_nn(kind, dtype):
    torch.manual_seed(21)
    kw = dict(batch_first=True)
    if kind.startswith("lstm"):
        kw["proj_size"] = 4 if kind == "lstm_proj" else 0
        ours, theirs = rnnfast.LSTM(6, 8, **kw), nn.LSTM(6, 8, **kw)
    elif kind == "gru":
        ours, theirs = rnnfast.GRU(6, 8, num_layers=2, **kw), nn.GRU(6, 8, num_layers=2, **kw)
    else:
        ours, theirs = rnnfast.RNN(6, 8, bidirectional=True, **kw), nn.RNN(
            6, 8, bidirectional=True, **kw)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(CUDA), theirs.to(CUDA)
    x = torch.randn(3, 7, 6, device=CUDA)
    results = []
    for model in (ours, theirs):
        with torch.autocast("cuda", dtype=dtype):
            out, state = model(x)
        h = state[0] if isinstance(state, tuple) else state
        results.append((out, h))
        (out.float().square().sum() + h.float().sum()).backward()
    (out, h), (ref_out, ref_h) = results
    # rnnfast runs in the autocast dtype. torch.nn's cuDNN RNNs cast to float16 whatever the
    # autocast dtype (ATen's AutocastRNN.cpp hard-codes kHalf), so only float16 is compared
    # dtype for dtype; the values are compared at the coarser of the two precisions.
    assert out.dtype == dtype and h.dtype == dtype
    if dtype == torch.float16:
        assert ref_out.dtype == torch.float16 and ref_h.dtype == torch.float16
    eps = max(torch.finfo(out.dtype).eps, torch.finfo(ref_out.dtype).eps)
    assert rel_err(out, ref_out) < 8 * eps
    assert rel_err(h, ref_h) < 8 * eps
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert p.grad is not None, f"{name}: no gradient under autocast"
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        tol = max(0.05, 16 * eps)
        assert rel_err(p.grad, q.grad) < tol, f"{name}: {rel_err(p.grad, q.grad):.3e}"


# ------------------------------------------------------------------------------------------
# The cell options (layer_norm, zoneout, recurrent_dropout, input_dropout) on CUDA
# (csrc/cuda/options_engine.cu), opt-in with RNNFAST_CUDA_CELL_OPTIONS=1
# ------------------------------------------------------------------------------------------

@pytest.fixture
def cuda_cell_options(monkeypatch):
    monkeypatch.setenv("RNNFAST_CUDA_CELL_OPTIONS", "1")


# Variants of one layer with options: which options (the masks given, as training draws
# them), and the layer's shape and direction.
OPTIONS_VARIANTS = {
    "norm": dict(norm=True),
    "norm_masks": dict(norm=True, dropout=True, zoneout=True),
    "norm_zoneout_p_lengths": dict(norm=True, zoneout_p=(0.3, 0.2), lengths=[7, 2, 5, 1, 6]),
    "masks_lengths_reverse": dict(dropout=True, zoneout=True, lengths=[3, 7, 1, 6, 2],
                                  reverse=True),
    "norm_masks_proj": dict(norm=True, dropout=True, zoneout=True, proj=5),
}


def options_layer_args(cell, variant, seed):
    """Keyword arguments of functional.layer_with_options (float64, on the CPU), random from a
    seeded generator, and the names of its differentiable ones."""
    generator = torch.Generator().manual_seed(seed)
    lstm = cell.startswith("lstm")
    gates = op_args.GATES[cell] * HIDDEN
    proj = variant.get("proj", 0)
    state = proj or HIDDEN

    def rand(*shape, scale=0.5):
        return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)

    def keep(*shape, p):
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) < p).double()

    args = dict(input=rand(STEPS, BATCH, INPUT), hx=rand(BATCH, state),
                cx=rand(BATCH, HIDDEN) if lstm else None, w_ih=rand(gates, INPUT),
                w_hh=rand(gates, state), b_ih=rand(gates), b_hh=rand(gates),
                w_hr=rand(state, HIDDEN) if proj else None)
    if variant.get("norm"):
        args.update(norm_ih_weight=1 + rand(gates), norm_hh_weight=1 + rand(gates))
        if lstm:
            args.update(norm_cell_weight=1 + rand(HIDDEN), norm_cell_bias=rand(HIDDEN))
    if variant.get("dropout"):
        args["recurrent_mask"] = keep(BATCH, state, p=0.7) / 0.7
    if variant.get("zoneout"):
        args["zoneout_mask"] = keep(STEPS, BATCH, state, p=0.3)
        if lstm:
            args["zoneout_cell_mask"] = keep(STEPS, BATCH, HIDDEN, p=0.25)
    zoneout, zoneout_cell = variant.get("zoneout_p", (0.0, 0.0))
    args.update(zoneout=zoneout, zoneout_cell=zoneout_cell if lstm else 0.0,
                reverse=variant.get("reverse", False))
    if "lengths" in variant:
        args["lengths"] = torch.tensor(variant["lengths"], dtype=torch.int64)
    names = [name for name, value in args.items()
             if torch.is_tensor(value) and value.is_floating_point() and "mask" not in name]
    return args, names


def run_options_layer(cell, args, names, device, dtype, seed=5):
    """output, h_n, c_n and the gradients of a weighted sum of them, by name."""
    from rnnfast import functional

    call = {name: (value.to(device, dtype) if torch.is_tensor(value) and value.is_floating_point()
                   else value) for name, value in args.items()}
    for name in names:
        call[name].requires_grad_()
    output, h_n, c_n = functional.layer_with_options(cell, **call)
    generator = torch.Generator().manual_seed(seed)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=torch.float64).to(
        device, dtype)).sum() for t in (output, h_n, c_n) if t.numel() > 0)
    grads = torch.autograd.grad(loss, [call[name] for name in names])
    result = dict(output=output, h_n=h_n, c_n=c_n if c_n.numel() > 0 else None)
    result.update({f"grad_{name}": grad for name, grad in zip(names, grads)})
    return result


OPTIONS_CASES = [(cell, variant) for cell in OP_CELLS for variant in OPTIONS_VARIANTS
                 if cell.startswith("lstm") or "proj" not in OPTIONS_VARIANTS[variant]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell, variant", OPTIONS_CASES,
                         ids=[f"{cell}-{variant}" for cell, variant in OPTIONS_CASES])
def test_options_layer_matches_cpu(cell, variant, dtype, cuda_cell_options):
    """One layer with cell options on CUDA against the CPU engine: outputs, final states and
    every gradient. float64: to 1e-10. float32: each engine against the CPU's float64 result,
    the CUDA engine's error no worse than twice the CPU engine's plus 1e-5 (the engines sum the
    GEMMs and the normalisations' rows in different orders)."""
    args, names = options_layer_args(cell, OPTIONS_VARIANTS[variant], seed=len(variant))
    gpu = run_options_layer(cell, args, names, CUDA, dtype)
    assert_on_cuda(gpu)
    if dtype == torch.float64:
        cpu = run_options_layer(cell, args, names, CPU, dtype)
        assert_results_close(gpu, cpu, TOL[dtype], f"{cell}/{variant} cuda vs cpu: ")
        return
    truth = run_options_layer(cell, args, names, CPU, torch.float64)
    cpu = run_options_layer(cell, args, names, CPU, dtype)
    for key, expected in truth.items():
        if expected is None:
            assert gpu[key] is None and cpu[key] is None, key
            continue
        gpu_err, cpu_err = rel_err(gpu[key], expected), rel_err(cpu[key], expected)
        assert gpu_err <= 2 * cpu_err + TOL[dtype], (
            f"{cell}/{variant} {key}: cuda's relative error {gpu_err:.3e} > 2 x the CPU "
            f"engine's {cpu_err:.3e} + {TOL[dtype]:.0e}")


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN])
def test_options_modules_match_cpu(cls, cuda_cell_options):
    """Modules with layer_norm and zoneout (evaluation: zoneout's expectation), stacked,
    bidirectional and packed, on CUDA against the CPU in float64: outputs, final states and the
    gradients of the input, the initial states and every parameter."""
    torch.manual_seed(8)
    options = dict(layer_norm=True, zoneout=0.2)
    if cls is rnnfast.LSTM:
        options["zoneout_cell"] = 0.1
    model = cls(INPUT, HIDDEN, num_layers=2, bidirectional=True, dtype=torch.float64,
                **options).eval()
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)
    shape = (4, BATCH, HIDDEN)
    hx = (torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)) \
        if cls is rnnfast.LSTM else torch.randn(shape, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 1, 6])
    cpu = run(copy.deepcopy(model), CPU, x, hx, lengths, False)
    gpu = run(copy.deepcopy(model), CUDA, x, hx, lengths, False)
    assert_on_cuda(gpu)
    assert_results_close(gpu, cpu, TOL[torch.float64], f"{cls.__name__} cuda vs cpu: ")


def test_options_on_cuda_are_opt_in(monkeypatch):
    """Without RNNFAST_CUDA_CELL_OPTIONS=1 a CUDA layer with options is refused, with how to
    opt in."""
    monkeypatch.delenv("RNNFAST_CUDA_CELL_OPTIONS", raising=False)
    model = rnnfast.GRU(INPUT, HIDDEN, layer_norm=True).to(CUDA)
    with pytest.raises(NotImplementedError, match="RNNFAST_CUDA_CELL_OPTIONS=1"):
        model(torch.randn(STEPS, BATCH, INPUT, device=CUDA))
