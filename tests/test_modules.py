"""rnnfast.LSTM/GRU/RNN and the cells against torch.nn (and, for the variants
torch.nn lacks, against the plain loops in tests/reference.py).

Every comparison covers the outputs, h_n, c_n and the gradients of the input,
h0, c0 and every parameter, under a loss that weights every output element
with fresh random weights.  Tolerance: ||a-b||_inf / ||b||_inf <= 1e-5
(float32), 1e-10 (float64), the same on every device.
"""

import contextlib
import copy
import itertools
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
import torch.nn.utils.prune  # noqa: F401  (torch.nn.utils.prune, which torch does not import)
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from cpp_entries import count_cpp_forward_calls
from reference import ReferenceCell, ReferenceRNN
from thread_count import torch_threads

CPU = torch.device("cpu")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


def assert_close_rel(actual, expected, what=""):
    """||actual - expected||_inf / ||expected||_inf <= 1e-5 (f32) / 1e-10 (f64)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, (
            f"{what}: got {'None' if actual is None else 'a tensor'}, "
            f"expected {'None' if expected is None else 'a tensor'}")
        return
    assert isinstance(actual, torch.Tensor), f"{what}: got {type(actual)}, expected a tensor"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != expected {expected.dtype}"
    tol = TOL[expected.dtype]
    a = actual.detach().to(CPU, torch.float64)
    b = expected.detach().to(CPU, torch.float64)
    assert torch.isfinite(b).all(), f"{what}: the expected value itself is not finite"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    ref = b.abs().max().item() if b.numel() else 0.0
    if ref == 0.0:
        assert err == 0.0, f"{what}: expected all zeros, got max abs {err:.3e}"
    else:
        rel = err / ref
        assert rel <= tol, f"{what}: relative error {rel:.3e} > {tol:.0e} (max abs err {err:.3e}, ||expected||_inf {ref:.3e})"


def compare_results(actual, expected, label=""):
    assert sorted(actual) == sorted(expected), f"{label}: result keys differ: {sorted(actual)} vs {sorted(expected)}"
    for k in expected:
        assert_close_rel(actual[k], expected[k], f"{label}{k}")


# --------------------------------------------------------------------------
# What is compared: the specs of the layers and cells
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    name: str
    mode: str          # 'LSTM', 'GRU', 'RNN'
    act: str = "tanh"  # LSTM activation / Elman nonlinearity
    proj: bool = False
    extra: bool = False  # not in torch.nn: compared against tests/reference.py

    def __str__(self):
        return self.name


STANDARD = [
    Spec("LSTM", "LSTM"),
    Spec("LSTM-proj", "LSTM", proj=True),
    Spec("GRU", "GRU"),
    Spec("RNN-tanh", "RNN", "tanh"),
    Spec("RNN-relu", "RNN", "relu"),
]
EXTRAS = [
    Spec("RNN-sigmoid", "RNN", "sigmoid", extra=True),
    Spec("LSTM-relu", "LSTM", "relu", extra=True),
    Spec("LSTM-relu-proj", "LSTM", "relu", proj=True, extra=True),
    Spec("LSTM-sigmoid", "LSTM", "sigmoid", extra=True),
]
ALL_SPECS = STANDARD + EXTRAS

CELL_STANDARD = [Spec("LSTMCell", "LSTM"), Spec("GRUCell", "GRU"),
                 Spec("RNNCell-tanh", "RNN", "tanh"), Spec("RNNCell-relu", "RNN", "relu")]
CELL_EXTRAS = [Spec("RNNCell-sigmoid", "RNN", "sigmoid", extra=True),
               Spec("LSTMCell-relu", "LSTM", "relu", extra=True),
               Spec("LSTMCell-sigmoid", "LSTM", "sigmoid", extra=True)]


def _skip_extra_on_torch_nn(rf, spec):
    if spec.extra and getattr(rf, "IS_TORCH_NN", False):
        pytest.skip("harness check against torch.nn: torch.nn has no such variant")


def _act_kwargs(spec):
    if spec.mode == "RNN":
        return {"nonlinearity": spec.act}
    if spec.mode == "LSTM" and spec.act != "tanh":
        return {"activation": spec.act}
    return {}


def rnnfast_layer(rf, spec, cfg, dtype, device):
    kw = dict(cfg)
    if spec.mode != "LSTM":
        kw.pop("proj_size", None)
    return getattr(rf, spec.mode)(**kw, **_act_kwargs(spec), device=device, dtype=dtype)


def expected_layer(spec, cfg, dtype):
    """torch.nn on the cpu, or the reference loop for the extras."""
    kw = dict(cfg)
    if spec.mode != "LSTM":
        kw.pop("proj_size", None)
    if spec.extra:
        return ReferenceRNN(spec.mode, **kw, act=spec.act, dtype=dtype)
    if spec.mode == "RNN":
        kw["nonlinearity"] = spec.act
    return getattr(nn, spec.mode)(**kw, dtype=dtype)


def expected_layer_in_float64(spec, cfg):
    """torch.nn's float32 layer (its parameters and state_dict) whose forward computes in
    float64 and rounds its results to float32: a float32 reference that does not depend on how
    the BLAS sums (torch.nn's own float32 LSTM over 40 rows on two threads has given outputs
    1.4e-5 apart on the same inputs from one process to the next). Gradients reach the float32
    parameters and inputs through the casts."""
    layer = expected_layer(spec, cfg, torch.float32)
    twin = copy.deepcopy(layer).double()

    def cast(value, dtype):
        if value is None:
            return None
        if isinstance(value, PackedSequence):
            return value._replace(data=value.data.to(dtype))
        if isinstance(value, tuple):
            return tuple(cast(v, dtype) for v in value)
        return value.to(dtype)

    def forward(x, hx=None):
        parameters = {name: p.double() for name, p in layer.named_parameters()}
        twin.train(layer.training)
        output, state = torch.func.functional_call(twin, parameters, (cast(x, torch.float64),
                                                                      cast(hx, torch.float64)))
        return cast(output, torch.float32), cast(state, torch.float32)

    layer.forward = forward
    return layer


def rnnfast_cell(rf, spec, cfg, dtype, device):
    return getattr(rf, spec.mode + "Cell")(**cfg, **_act_kwargs(spec), device=device, dtype=dtype)


def expected_cell(spec, cfg, dtype):
    if spec.extra:
        return ReferenceCell(spec.mode, **cfg, act=spec.act, dtype=dtype)
    kw = {"nonlinearity": spec.act} if spec.mode == "RNN" else {}
    return getattr(nn, spec.mode + "Cell")(**cfg, **kw, dtype=dtype)


# --------------------------------------------------------------------------
# Harness: run a module, weight every output with random weights, backprop
# --------------------------------------------------------------------------

def evaluate(module, device, leaves, call, loss_w=None):
    """leaves: dict of cpu tensors (input, h0, c0) that become grad leaves on
    `device`; call(module, leaves) -> (dict of outputs, metadata).
    Returns ({outputs, grad_<leaf>, grad_<param>}, metadata, loss weights)."""
    # torch.nn's oneDNN path re-creates its kernels for every new shape (~0.1 s per
    # call); the native path is the same torch.nn math, so use it for the tiny sizes here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            return _evaluate(module, device, leaves, call, loss_w)


def _evaluate(module, device, leaves, call, loss_w):
    leaves = {k: v.detach().to(device).requires_grad_() for k, v in leaves.items()}
    before = {k: v.detach().clone() for k, v in leaves.items()}
    outs, meta = call(module, leaves)
    for k, v in outs.items():
        assert v.device.type == device.type, f"{k} is on {v.device}, expected {device}"
    for k, v in leaves.items():
        assert torch.equal(v.detach(), before[k]), f"the module modified its argument {k} in place"
    if loss_w is None:
        loss_w = {k: torch.randn(v.shape, dtype=v.dtype) for k, v in outs.items()}
    loss = sum((outs[k] * loss_w[k].to(device)).sum() for k in sorted(outs))
    for p in module.parameters():
        p.grad = None
    loss.backward()
    res = {k: v.detach() for k, v in outs.items()}
    for k, v in leaves.items():
        res["grad_" + k] = v.grad
    for n, p in module.named_parameters():
        res["grad_" + n] = p.grad
    return res, meta, loss_w


def layer_call(is_lstm, lengths, batch_first):
    def call(module, leaves):
        x = leaves["input"]
        if lengths is not None:
            x = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        if "h0" in leaves:
            hx = (leaves["h0"], leaves["c0"]) if is_lstm else leaves["h0"]
            result = module(x, hx)
        else:
            result = module(x)
        assert isinstance(result, tuple) and len(result) == 2, "forward must return (output, h_n)"
        output, hn = result
        meta = None
        if lengths is not None:
            assert isinstance(output, PackedSequence), f"packed input must give a PackedSequence, got {type(output)}"
            meta = (output.batch_sizes, output.sorted_indices, output.unsorted_indices)
            output = output.data
        else:
            assert isinstance(output, torch.Tensor) and not isinstance(output, PackedSequence)
        outs = {"output": output}
        if is_lstm:
            assert isinstance(hn, tuple) and len(hn) == 2, "LSTM must return (output, (h_n, c_n))"
            outs["h_n"], outs["c_n"] = hn
        else:
            assert isinstance(hn, torch.Tensor), "GRU/RNN must return (output, h_n) with a tensor h_n"
            outs["h_n"] = hn
        return outs, meta
    return call


def cell_call(is_lstm):
    def call(module, leaves):
        x = leaves["input"]
        if "h0" in leaves:
            hx = (leaves["h0"], leaves["c0"]) if is_lstm else leaves["h0"]
            result = module(x, hx)
        else:
            result = module(x)
        if is_lstm:
            assert isinstance(result, tuple) and len(result) == 2, "LSTMCell must return (h, c)"
            return {"h": result[0], "c": result[1]}, None
        assert isinstance(result, torch.Tensor)
        return {"h": result}, None
    return call


def compare_meta(actual, expected):
    if expected is None:
        assert actual is None
        return
    for name, a, b in zip(("batch_sizes", "sorted_indices", "unsorted_indices"), actual, expected):
        assert torch.equal(a.cpu(), b.cpu()), f"PackedSequence.{name}: {a} != {b}"


def rand_int(lo, hi):
    """Uniform integer in [lo, hi] from the (per-test seeded) global generator."""
    return int(torch.randint(lo, hi + 1, ()).item())


def layer_case(spec, *, num_layers, bidirectional, batch_first, bias, layout, hx_given,
               dtype, dropout=0.0, sizes=None):
    """Random sizes and inputs for one layer test -> (cfg, leaves, lengths)."""
    if sizes is None:
        sizes = dict(T=rand_int(1, 6), B=rand_int(2 if layout == "packed" else 1, 4),
                     I=rand_int(1, 4), H=rand_int(2, 5))
    T, B, I, H = sizes["T"], sizes["B"], sizes["I"], sizes["H"]
    P = sizes.get("P", rand_int(1, H - 1) if spec.proj else 0)
    cfg = dict(input_size=I, hidden_size=H, num_layers=num_layers, bias=bias,
               batch_first=batch_first, dropout=dropout, bidirectional=bidirectional)
    if spec.mode == "LSTM":
        cfg["proj_size"] = P
    D = 2 if bidirectional else 1
    H_out = P if P > 0 else H
    lengths = None
    if layout == "unbatched":
        x = torch.randn(T, I, dtype=dtype)
        state_shape = (num_layers * D,)
    else:
        x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=dtype)
        state_shape = (num_layers * D, B)
        if layout == "packed":
            # random lengths including the maximum, not already sorted, so
            # that enforce_sorted=False really permutes the batch (and hx)
            lengths = torch.randint(1, T + 1, (B,))
            lengths[torch.randint(0, B, ())] = T
            if bool((lengths[:-1] >= lengths[1:]).all()):
                lengths = lengths.flip(0)
    leaves = {"input": x}
    if hx_given:
        leaves["h0"] = torch.randn(*state_shape, H_out, dtype=dtype)
        if spec.mode == "LSTM":
            leaves["c0"] = torch.randn(*state_shape, H, dtype=dtype)
    return cfg, leaves, lengths


def check_layer(rf, spec, device, dtype, *, train=True, make_actual=None, make_expected=None,
                sizes=None, **case):
    """Build the expected module on the cpu, load its state_dict into rnnfast
    (strict) on `device`, compare everything; on a non-cpu device also compare
    with rnnfast on the cpu.  make_actual(cfg, device) / make_expected(cfg)
    override how the two modules are built."""
    cfg, leaves, lengths = layer_case(spec, dtype=dtype, sizes=sizes, **case)
    make_actual = make_actual or (lambda cfg, dev: rnnfast_layer(rf, spec, cfg, dtype, dev))
    make_expected = make_expected or (lambda cfg: expected_layer(spec, cfg, dtype))
    expected = make_expected(cfg).train(train)
    actual = make_actual(cfg, device)
    actual.load_state_dict(expected.state_dict(), strict=True)
    actual.train(train)
    call = layer_call(spec.mode == "LSTM", lengths, cfg["batch_first"])
    exp, exp_meta, w = evaluate(expected, CPU, leaves, call)
    got, got_meta, _ = evaluate(actual, device, leaves, call, w)
    compare_results(got, exp)
    compare_meta(got_meta, exp_meta)
    if device.type != "cpu":
        on_cpu = make_actual(cfg, CPU)
        on_cpu.load_state_dict(actual.state_dict(), strict=True)
        on_cpu.train(train)
        cpu_res, cpu_meta, _ = evaluate(on_cpu, CPU, leaves, call, w)
        compare_results(got, cpu_res, f"{device.type} vs cpu: ")
        compare_meta(got_meta, cpu_meta)


def check_layer_no_grad(rf, spec, device, dtype, *, sizes, **case):
    """The outputs under no_grad (the engine's inference forward) against torch.nn's."""
    cfg, leaves, lengths = layer_case(spec, dtype=dtype, sizes=sizes, **case)
    expected = expected_layer(spec, cfg, dtype)
    actual = rnnfast_layer(rf, spec, cfg, dtype, device)
    actual.load_state_dict(expected.state_dict(), strict=True)
    call = layer_call(spec.mode == "LSTM", lengths, cfg["batch_first"])
    with torch.no_grad():
        exp, _ = call(expected, leaves)
        got, _ = call(actual, {k: v.to(device) for k, v in leaves.items()})
    for k in exp:
        assert_close_rel(got[k].cpu(), exp[k], k)


def check_cell(rf, spec, device, dtype, *, bias, unbatched, hx_given, make_actual=None, sizes=None):
    s = sizes or dict(B=rand_int(1, 4), I=rand_int(1, 4), H=rand_int(1, 5))
    cfg = dict(input_size=s["I"], hidden_size=s["H"], bias=bias)
    make_actual = make_actual or (lambda dev: rnnfast_cell(rf, spec, cfg, dtype, dev))
    batch = () if unbatched else (s["B"],)
    leaves = {"input": torch.randn(*batch, s["I"], dtype=dtype)}
    if hx_given:
        leaves["h0"] = torch.randn(*batch, s["H"], dtype=dtype)
        if spec.mode == "LSTM":
            leaves["c0"] = torch.randn(*batch, s["H"], dtype=dtype)
    expected = expected_cell(spec, cfg, dtype)
    actual = make_actual(device)
    actual.load_state_dict(expected.state_dict(), strict=True)
    call = cell_call(spec.mode == "LSTM")
    exp, _, w = evaluate(expected, CPU, leaves, call)
    got, _, _ = evaluate(actual, device, leaves, call, w)
    compare_results(got, exp)
    if device.type != "cpu":
        on_cpu = make_actual(CPU)
        on_cpu.load_state_dict(actual.state_dict(), strict=True)
        cpu_res, _, _ = evaluate(on_cpu, CPU, leaves, call, w)
        compare_results(got, cpu_res, f"{device.type} vs cpu: ")


# --------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------

LAYOUTS = ["batched", "unbatched", "packed"]  # packed+unbatched does not exist
AXES = [  # (argument, values, ids)
    ("num_layers", [1, 2, 3], ["L1", "L2", "L3"]),
    ("bidirectional", [False, True], ["uni", "bi"]),
    ("batch_first", [False, True], ["seqfirst", "batchfirst"]),
    ("bias", [True, False], ["bias", "nobias"]),
    ("layout", LAYOUTS, LAYOUTS),
    ("hx_given", [False, True], ["nohx", "hx"]),
]


def grid_cases(dtype):
    """The full product of AXES for float64.  For float32 the fraction whose
    value indices sum to 0 mod 3: every combination of values of any 4 of the
    6 axes still occurs (the 2 free axes always reach every residue mod 3),
    at a third of the cost."""
    out = []
    for idx in itertools.product(*(range(len(vals)) for _, vals, _ in AXES)):
        if dtype == torch.float32 and sum(idx) % 3:
            continue
        values = [vals[i] for (_, vals, _), i in zip(AXES, idx)]
        ids = [names[i] for (_, _, names), i in zip(AXES, idx)]
        out.append(pytest.param(*values, dtype, id="-".join(ids + [DTYPE_IDS[dtype]])))
    return out


DTYPE_IDS = {torch.float32: "f32", torch.float64: "f64"}
GRID_ARGS = ",".join([name for name, _, _ in AXES] + ["dtype"])
GRID = grid_cases(torch.float64) + grid_cases(torch.float32)


def test_float32_grid_covers_every_4_axis_combination():
    f32 = [tuple(p.values[:-1]) for p in grid_cases(torch.float32)]
    for axes in itertools.combinations(range(len(AXES)), 4):
        seen = {tuple(case[a] for a in axes) for case in f32}
        assert len(seen) == math.prod(len(AXES[a][1]) for a in axes), [AXES[a][0] for a in axes]


@pytest.mark.parametrize(GRID_ARGS, GRID)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_layer_matches_torch(rf, device, spec, num_layers, bidirectional, batch_first, bias,
                             layout, hx_given, dtype):
    """rnnfast.LSTM/GRU/RNN == torch.nn (extras: == tests/reference.py)."""
    _skip_extra_on_torch_nn(rf, spec)
    check_layer(rf, spec, device, dtype, num_layers=num_layers, bidirectional=bidirectional,
                batch_first=batch_first, bias=bias, layout=layout, hx_given=hx_given)


@pytest.mark.parametrize(GRID_ARGS, GRID)
@pytest.mark.parametrize("spec", STANDARD, ids=str)
def test_reference_matches_torch(spec, num_layers, bidirectional, batch_first, bias, layout,
                                 hx_given, dtype):
    """tests/reference.py == torch.nn for the standard activations, so that it
    can be trusted for the extras."""
    ref_spec = Spec(spec.name, spec.mode, spec.act, spec.proj, extra=True)
    check_layer(None, spec, CPU, dtype, num_layers=num_layers, bidirectional=bidirectional,
                batch_first=batch_first, bias=bias, layout=layout, hx_given=hx_given,
                make_actual=lambda cfg, dev: expected_layer(ref_spec, cfg, dtype))


# --------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hx_given", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("spec", CELL_STANDARD + CELL_EXTRAS, ids=str)
def test_cell_matches_torch(rf, device, spec, bias, unbatched, hx_given, dtype):
    _skip_extra_on_torch_nn(rf, spec)
    check_cell(rf, spec, device, dtype, bias=bias, unbatched=unbatched, hx_given=hx_given)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hx_given", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("spec", CELL_STANDARD, ids=str)
def test_reference_cell_matches_torch(spec, bias, unbatched, hx_given, dtype):
    s = dict(B=rand_int(1, 4), I=rand_int(1, 4), H=rand_int(1, 5))
    cfg = dict(input_size=s["I"], hidden_size=s["H"], bias=bias)
    check_cell(None, spec, CPU, dtype, bias=bias, unbatched=unbatched, hx_given=hx_given, sizes=s,
               make_actual=lambda dev: ReferenceCell(spec.mode, **cfg, act=spec.act, dtype=dtype))


# --------------------------------------------------------------------------
# Shapes, edge sizes, explicit defaults
# --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if not s.proj], ids=str)
def test_size_one_everything(rf, device, spec, num_layers, bidirectional, layout):
    """T=1, B=1, H=1, input_size=1."""
    _skip_extra_on_torch_nn(rf, spec)
    check_layer(rf, spec, device, torch.float64, num_layers=num_layers, bidirectional=bidirectional,
                batch_first=False, bias=True, layout=layout, hx_given=True,
                sizes=dict(T=1, B=1, I=1, H=1))


@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if s.proj], ids=str)
def test_size_one_with_projection(rf, device, spec):
    """T=1, B=1, proj_size=1 (the smallest projection, hidden_size=2)."""
    _skip_extra_on_torch_nn(rf, spec)
    check_layer(rf, spec, device, torch.float64, num_layers=2, bidirectional=True,
                batch_first=True, bias=True, layout="batched", hx_given=True,
                sizes=dict(T=1, B=1, I=1, H=2, P=1))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_output_shapes(rf, device, spec, layout):
    _skip_extra_on_torch_nn(rf, spec)
    T, B, I, H, L = 5, 3, 4, 6, 2
    P = 2 if spec.proj else 0
    cfg = dict(input_size=I, hidden_size=H, num_layers=L, bidirectional=True, batch_first=True)
    if spec.mode == "LSTM":
        cfg["proj_size"] = P
    mod = rnnfast_layer(rf, spec, cfg, torch.float32, device)
    H_out = P or H
    if layout == "unbatched":
        x = torch.randn(T, I, device=device)
        out, hn = mod(x)
        assert out.shape == (T, 2 * H_out)
        state = (2 * L,)
    else:
        x = torch.randn(B, T, I, device=device)
        if layout == "packed":
            x = pack_padded_sequence(x, [T, 2, 4], batch_first=True, enforce_sorted=False)
        out, hn = mod(x)
        if layout == "packed":
            assert isinstance(out, PackedSequence)
            assert out.data.shape == (T + 2 + 4, 2 * H_out)
        else:
            assert out.shape == (B, T, 2 * H_out)
        state = (2 * L, B)
    if spec.mode == "LSTM":
        assert hn[0].shape == (*state, H_out)
        assert hn[1].shape == (*state, H)
    else:
        assert hn.shape == (*state, H)


def test_explicit_default_activation(rf, device):
    """activation='tanh' / nonlinearity='tanh' given explicitly == the default."""
    if getattr(rf, "IS_TORCH_NN", False):
        pytest.skip("torch.nn.LSTM has no activation argument")
    spec = Spec("LSTM", "LSTM")
    check_layer(rf, spec, device, torch.float64, num_layers=2, bidirectional=True, batch_first=False,
                bias=True, layout="packed", hx_given=True,
                make_actual=lambda cfg, dev: rf.LSTM(**cfg, activation="tanh",
                                                     device=dev, dtype=torch.float64))
    check_cell(rf, spec, device, torch.float64, bias=True, unbatched=False, hx_given=True,
               sizes=dict(B=3, I=2, H=4),
               make_actual=lambda dev: rf.LSTMCell(2, 4, activation="tanh", device=dev,
                                                   dtype=torch.float64))


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_constructor_defaults_and_attributes(rf, mode):
    ours, theirs = getattr(rf, mode)(3, 4), getattr(nn, mode)(3, 4)
    attrs = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"]
    attrs += ["proj_size"] if mode == "LSTM" else []
    attrs += ["nonlinearity"] if mode == "RNN" else []
    for a in attrs:
        assert getattr(ours, a) == getattr(theirs, a), f"{mode}.{a}: {getattr(ours, a)!r} != {getattr(theirs, a)!r}"
    assert ours.training
    for p in ours.parameters():
        assert p.dtype == torch.get_default_dtype() and p.device.type == "cpu"
    cell_ours, cell_theirs = getattr(rf, mode + "Cell")(3, 4), getattr(nn, mode + "Cell")(3, 4)
    attrs = ["input_size", "hidden_size", "bias"] + (["nonlinearity"] if mode == "RNN" else [])
    for a in attrs:
        assert getattr(cell_ours, a) == getattr(cell_theirs, a), f"{mode}Cell.{a}"


# --------------------------------------------------------------------------
# Parameters: names, shapes, state_dict, initialisation, dtype conversion
# --------------------------------------------------------------------------

PARAM_CONFIGS = [
    dict(num_layers=1, bias=True, bidirectional=False),
    dict(num_layers=3, bias=False, bidirectional=True),
    dict(num_layers=2, bias=True, bidirectional=True),
]


@pytest.mark.parametrize("conf", PARAM_CONFIGS, ids=["L1", "L3-nobias-bi", "L2-bi"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_parameter_names_and_shapes(rf, spec, conf):
    _skip_extra_on_torch_nn(rf, spec)
    cfg = dict(input_size=3, hidden_size=5, **conf)
    if spec.mode == "LSTM":
        cfg["proj_size"] = 2 if spec.proj else 0
    ours = rnnfast_layer(rf, spec, cfg, None, None)
    theirs = getattr(nn, spec.mode)(**cfg)  # the parameters do not depend on the activation
    got = [(n, tuple(p.shape)) for n, p in ours.named_parameters()]
    want = [(n, tuple(p.shape)) for n, p in theirs.named_parameters()]
    assert got == want
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("spec", CELL_STANDARD + CELL_EXTRAS, ids=str)
def test_cell_parameter_names_and_shapes(rf, spec, bias):
    _skip_extra_on_torch_nn(rf, spec)
    cfg = dict(input_size=3, hidden_size=5, bias=bias)
    ours = rnnfast_cell(rf, spec, cfg, None, None)
    theirs = getattr(nn, spec.mode + "Cell")(**cfg)
    assert [(n, tuple(p.shape)) for n, p in ours.named_parameters()] == \
        [(n, tuple(p.shape)) for n, p in theirs.named_parameters()]
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())


def _check_state_dict_both_ways(ours, theirs_factory):
    # torch.nn -> rnnfast
    theirs = theirs_factory()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for (n, a), (m, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert n == m and torch.equal(a.cpu(), b.cpu()), n
    # rnnfast -> torch.nn: give ours new values first
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(-1, 1)
    theirs2 = theirs_factory()
    theirs2.load_state_dict(ours.state_dict(), strict=True)
    for (n, a), (m, b) in zip(ours.state_dict().items(), theirs2.state_dict().items()):
        assert n == m and torch.equal(a.cpu(), b.cpu()), n


@pytest.mark.parametrize("conf", PARAM_CONFIGS, ids=["L1", "L3-nobias-bi", "L2-bi"])
@pytest.mark.parametrize("spec", STANDARD, ids=str)
def test_state_dict_strict_both_ways(rf, spec, conf, device):
    cfg = dict(input_size=3, hidden_size=5, **conf)
    if spec.mode == "LSTM":
        cfg["proj_size"] = 2 if spec.proj else 0
    ours = rnnfast_layer(rf, spec, cfg, None, device)
    _check_state_dict_both_ways(ours, lambda: expected_layer(spec, cfg, None))


@pytest.mark.parametrize("spec", CELL_STANDARD, ids=str)
def test_cell_state_dict_strict_both_ways(rf, spec, device):
    cfg = dict(input_size=3, hidden_size=5, bias=True)
    ours = rnnfast_cell(rf, spec, cfg, None, device)
    _check_state_dict_both_ways(ours, lambda: expected_cell(spec, cfg, None))


def _check_uniform_init(params, k, label):
    allv = []
    for n, p in params:
        v = p.detach().cpu().double().flatten()
        assert v.abs().max() <= k, f"{label}.{n}: |value| {v.abs().max():.4f} > 1/sqrt(H) = {k:.4f}"
        assert v.unique().numel() > 1, f"{label}.{n}: all values equal"
        allv.append(v)
    v = torch.cat(allv)
    n = v.numel()
    # U(-k, k): mean 0 (sd k/sqrt(3n)), variance k^2/3 (sd k^2 sqrt(4/45)/sqrt(n)); 6 sigma.
    assert abs(v.mean().item()) < 6 * k / math.sqrt(3 * n), f"{label}: mean {v.mean():.4f}"
    assert abs(v.var().item() - k * k / 3) < 6 * k * k * math.sqrt(4 / 45) / math.sqrt(n), \
        f"{label}: variance {v.var():.5f}, expected {k * k / 3:.5f}"
    assert v.max() > 0.9 * k and v.min() < -0.9 * k, f"{label}: values do not fill [-k, k]"


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_default_init(rf, spec, device):
    _skip_extra_on_torch_nn(rf, spec)
    H = 16
    cfg = dict(input_size=7, hidden_size=H, num_layers=2, bidirectional=True, bias=True)
    if spec.mode == "LSTM":
        cfg["proj_size"] = 5 if spec.proj else 0
    a = rnnfast_layer(rf, spec, cfg, None, device)
    _check_uniform_init(a.named_parameters(), 1 / math.sqrt(H), spec.name)
    b = rnnfast_layer(rf, spec, cfg, None, device)
    assert not torch.equal(a.weight_hh_l0, b.weight_hh_l0), "two modules got identical weights"
    # and different parameters of the same module are not copies of each other
    assert not torch.equal(a.weight_hh_l0, a.weight_hh_l0_reverse)


@pytest.mark.parametrize("spec", CELL_STANDARD + CELL_EXTRAS, ids=str)
def test_cell_default_init(rf, spec, device):
    _skip_extra_on_torch_nn(rf, spec)
    H = 16
    a = rnnfast_cell(rf, spec, dict(input_size=7, hidden_size=H, bias=True), None, device)
    _check_uniform_init(a.named_parameters(), 1 / math.sqrt(H), spec.name)


@pytest.mark.parametrize("conversion", ["double", "to_float64", "double_then_float"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_dtype_conversion(rf, spec, device, conversion):
    """Modules built in float32 and converted with .double() / .to(float64) /
    .double().float() behave like torch.nn converted the same way."""
    _skip_extra_on_torch_nn(rf, spec)
    target = torch.float32 if conversion == "double_then_float" else torch.float64

    def convert(m):
        if conversion == "double":
            return m.double()
        if conversion == "to_float64":
            return m.to(torch.float64)
        return m.double().float()

    def make_actual(cfg, dev):
        m = convert(rnnfast_layer(rf, spec, cfg, torch.float32, dev))
        for p in m.parameters():
            assert p.dtype == target
        return m

    check_layer(rf, spec, device, target, num_layers=2, bidirectional=True, batch_first=False,
                bias=True, layout="packed", hx_given=True, make_actual=make_actual,
                make_expected=lambda cfg: convert(expected_layer(spec, cfg, torch.float32)))


@pytest.mark.parametrize("spec", CELL_STANDARD, ids=str)
def test_cell_dtype_conversion(rf, spec, device):
    cfg = dict(input_size=3, hidden_size=4, bias=True)
    check_cell(rf, spec, device, torch.float64, bias=True, unbatched=False, hx_given=True,
               sizes=dict(B=2, I=3, H=4),
               make_actual=lambda dev: rnnfast_cell(rf, spec, cfg, torch.float32, dev).double())


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_dropout_eval_mode_matches_torch(rf, device, spec, layout):
    _skip_extra_on_torch_nn(rf, spec)
    check_layer(rf, spec, device, torch.float64, train=False, dropout=0.5, num_layers=3,
                bidirectional=True, batch_first=True, bias=True, layout=layout, hx_given=True)


def _layer_forward(mod, x, device):
    out, _ = mod(x.to(device))
    return out


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_dropout_train_mode_differs_from_eval(rf, device, spec):
    _skip_extra_on_torch_nn(rf, spec)
    cfg = dict(input_size=4, hidden_size=5, num_layers=2, dropout=0.5, bidirectional=True)
    if spec.mode == "LSTM":
        cfg["proj_size"] = 3 if spec.proj else 0
    mod = rnnfast_layer(rf, spec, cfg, torch.float64, device)
    x = torch.randn(6, 4, 4, dtype=torch.float64, device=device, requires_grad=True)
    out_train, _ = mod.train()(x)
    out_eval, _ = mod.eval()(x)
    assert (out_train - out_eval).abs().max() > 1e-3, "dropout had no effect in training mode"
    # and training-mode backward works and is finite
    mod.train()
    out, _ = mod(x)
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mod.parameters())


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_dropout_single_layer_is_ignored(rf, device, spec):
    """Dropout acts between layers only: a single-layer module in training mode
    equals eval mode and torch.nn."""
    _skip_extra_on_torch_nn(rf, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_layer(rf, spec, device, torch.float64, train=True, dropout=0.5, num_layers=1,
                    bidirectional=True, batch_first=False, bias=True, layout="packed", hx_given=True)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_dropout_single_layer_warns_like_torch(rf, mode):
    with pytest.warns(UserWarning, match="dropout"):
        getattr(nn, mode)(3, 4, num_layers=1, dropout=0.5)
    with pytest.warns(UserWarning, match="dropout"):
        getattr(rf, mode)(3, 4, num_layers=1, dropout=0.5)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_dropout_one_zeroes_the_input_of_layer_two(rf, device, spec, bidirectional):
    """dropout=1.0, two layers, training mode: layer 2 sees zeros, so the
    module equals (layer 1 on x) and (layer 2 on zeros), each a 1-layer module."""
    _skip_extra_on_torch_nn(rf, spec)
    dtype = torch.float64
    T, B, I, H = 5, 3, 4, 5
    P = 2 if spec.proj else 0
    D = 2 if bidirectional else 1
    H_out = P or H
    is_lstm = spec.mode == "LSTM"
    cfg = dict(input_size=I, hidden_size=H, num_layers=2, dropout=1.0, bidirectional=bidirectional)
    if is_lstm:
        cfg["proj_size"] = P
    ours = rnnfast_layer(rf, spec, cfg, dtype, device).train()

    def one_layer(layer, in_size):
        c = dict(cfg, num_layers=1, dropout=0.0, input_size=in_size)
        m = expected_layer(spec, c, dtype)
        src = {k: v for k, v in ours.state_dict().items() if f"_l{layer}" in k}
        m.load_state_dict({k.replace(f"_l{layer}", "_l0"): v.cpu() for k, v in src.items()}, strict=True)
        return m

    first, second = one_layer(0, I), one_layer(1, D * H_out)
    x = torch.randn(T, B, I, dtype=dtype)
    h0 = torch.randn(2 * D, B, H_out, dtype=dtype)
    c0 = torch.randn(2 * D, B, H, dtype=dtype)

    xd = x.to(device).requires_grad_()
    hx = (h0.to(device), c0.to(device)) if is_lstm else h0.to(device)
    out, hn = ours(xd, hx)

    def split(h):
        return h[:D], h[D:]

    e1_out, e1_hn = first(x, (split(h0)[0], split(c0)[0]) if is_lstm else split(h0)[0])
    e2_out, e2_hn = second(torch.zeros(T, B, D * H_out, dtype=dtype),
                           (split(h0)[1], split(c0)[1]) if is_lstm else split(h0)[1])
    assert_close_rel(out, e2_out, "output")
    if is_lstm:
        assert_close_rel(hn[0], torch.cat([e1_hn[0], e2_hn[0]]), "h_n")
        assert_close_rel(hn[1], torch.cat([e1_hn[1], e2_hn[1]]), "c_n")
    else:
        assert_close_rel(hn, torch.cat([e1_hn, e2_hn]), "h_n")
    # gradients: the output does not depend on x, and layer 2's input weights get zero gradient
    out.sum().backward(retain_graph=True)
    assert xd.grad is None or torch.count_nonzero(xd.grad) == 0, "output depends on x despite dropout=1"
    assert torch.count_nonzero(ours.weight_ih_l1.grad) == 0


@pytest.mark.parametrize("p", [0.25, 0.5])
def test_dropout_mask_is_inverted_bernoulli(rf, device, p):
    """Layer 2 of a relu Elman made the identity (W_ih = I, W_hh = 0, b = 0) shows
    its input: training-mode dropout must zero a fraction ~p of the elements,
    independently per time step, and scale the rest by 1/(1-p), like F.dropout."""
    T, B, H = 40, 25, 8
    mod = rf.RNN(H, H, num_layers=2, nonlinearity="relu", dropout=p, device=device,
                 dtype=torch.float64).train()
    with torch.no_grad():
        mod.weight_ih_l0.copy_(torch.rand(H, H) + 0.1)
        mod.weight_hh_l0.zero_()
        mod.bias_ih_l0.fill_(0.1)
        mod.bias_hh_l0.zero_()
        mod.weight_ih_l1.copy_(torch.eye(H))
        mod.weight_hh_l1.zero_()
        mod.bias_ih_l1.zero_()
        mod.bias_hh_l1.zero_()
    x = torch.rand(T, B, H, dtype=torch.float64, device=device)
    out, hn = mod(x)
    layer1 = hn[0]  # last step of layer 1; full layer-1 output = relu(x W^T + b) (W_hh = 0)
    h1 = torch.relu(x @ mod.weight_ih_l0.detach().t() + 0.1)
    assert_close_rel(layer1, h1[-1], "layer-1 h_n")
    ratio = (out / h1).cpu()
    kept = ratio != 0
    assert_close_rel(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)), "kept elements / input")
    frac = 1 - kept.double().mean().item()
    sd = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(frac - p) < 6 * sd, f"dropped fraction {frac:.3f}, expected {p}"
    same_as_previous_step = (kept[1:] == kept[:-1]).double().mean().item()
    assert same_as_previous_step < 0.9, "the dropout mask does not change over time"


@pytest.mark.parametrize("spec", STANDARD + EXTRAS, ids=str)
def test_dropout_train_mode_reproducible_and_gradient_consistent(rf, device, spec):
    """Training mode with dropout: the same torch.manual_seed gives the same
    result (as torch.nn), and backward is the derivative of that forward
    (gradcheck with the seed reset before every evaluation)."""
    _skip_extra_on_torch_nn(rf, spec)
    cfg = dict(input_size=2, hidden_size=3, num_layers=2, dropout=0.4, bidirectional=True)
    if spec.mode == "LSTM":
        cfg["proj_size"] = 2 if spec.proj else 0
    mod = rnnfast_layer(rf, spec, cfg, torch.float64, device).train()
    x = torch.randn(4, 2, 2, dtype=torch.float64, device=device, requires_grad=True)

    def f(x):
        torch.manual_seed(1234)
        if device.type == "cuda":
            torch.cuda.manual_seed(1234)
        out, hn = mod(x)
        return out, hn[0] if spec.mode == "LSTM" else hn

    a, b = f(x), f(x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------
# Which tensors need gradients; inference; sizes that fill SIMD registers
# --------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["no_grad", "inference_mode", "params_only", "input_only",
                                  "state_only", "nothing_requires_grad"])
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_gradient_requirements(rf, device, spec, layout, what):
    """Forward under no_grad / inference_mode / with only some tensors requiring
    grad gives the same outputs, and exactly the requested gradients, right."""
    _skip_extra_on_torch_nn(rf, spec)
    expected, actual, leaves, lengths = _two_layer_bidirectional_pair(rf, spec, device,
                                                                      layout=layout)
    call = layer_call(spec.mode == "LSTM", lengths, False)
    full, _, w = evaluate(expected, CPU, leaves, call)

    wanted = {"params_only": {"params"}, "input_only": {"input"},
              "state_only": {"h0", "c0"}}.get(what, set())
    for p in actual.parameters():
        p.requires_grad_("params" in wanted)
    lv = {k: v.to(device).requires_grad_(k in wanted) for k, v in leaves.items()}
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(
        what, contextlib.nullcontext)
    with context():
        outs, _ = call(actual, lv)
    for k in outs:
        assert_close_rel(outs[k], full[k], k)
    if not wanted:
        assert not any(v.requires_grad for v in outs.values())
        return
    loss = sum((outs[k] * w[k].to(device)).sum() for k in sorted(outs))
    loss.backward()
    for k, v in lv.items():
        if k in wanted:
            assert_close_rel(v.grad, full["grad_" + k], "grad_" + k)
        else:
            assert v.grad is None
    for n, p in actual.named_parameters():
        if "params" in wanted:
            assert_close_rel(p.grad, full["grad_" + n], "grad_" + n)
        else:
            assert p.grad is None


@pytest.mark.parametrize("spec", STANDARD, ids=str)
def test_one_batch_row_past_the_tiled_kernel(rf, device, spec):
    """One batch row and W_hh past the tiled kernel's 64K elements: the backward's per-step
    products of one row run in the CPU engine's row_times_matrix (csrc/cpu/blas.h), over 300
    outputs (passes of 64 and a partial vector)."""
    sizes = dict(T=15, B=1, I=40, H=300, P=150 if spec.proj else 0)
    check_layer(rf, spec, device, torch.float32, num_layers=1, bidirectional=True,
                batch_first=True, bias=True, layout="batched", hx_given=True, sizes=sizes)


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_packed_input_products_on_the_active_rows(rf, device, mode, grad):
    """A packed sequence of lengths 1-12 of 12, wide enough for the CPU engine to run its input
    projection on the active rows only (gathered, then moved to their padded places), and in
    training the input's and W_ih's gradients in groups of steps that leave most padding out:
    both directions and two layers give torch.nn's outputs and gradients."""
    torch.manual_seed(0)
    steps, batch, input_size, hidden = 12, 24, 128, 96
    expected = getattr(nn, mode)(input_size, hidden, num_layers=2, bidirectional=True)
    actual = getattr(rf, mode)(input_size, hidden, num_layers=2, bidirectional=True).to(device)
    actual.load_state_dict(expected.state_dict())
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[0] = steps
    x = torch.randn(steps, batch, input_size)
    results = []
    for module, on in ((expected, CPU), (actual, device)):
        leaf = x.clone().to(on).requires_grad_(grad)
        packed = pack_padded_sequence(leaf, lengths, enforce_sorted=False)
        with torch.set_grad_enabled(grad):
            out, _ = module(packed)
        if grad:
            out.data.square().sum().backward()
            results.append([out.data, leaf.grad, *(p.grad for p in module.parameters())])
        else:
            results.append([out.data])
    for got, want in zip(*results):
        assert_close_rel(got.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("H", [8, 17, 64])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_larger_sizes(rf, device, spec, H, layout, dtype):
    """Hidden sizes that fill (8, 64) and overhang (17) vector registers, longer sequences."""
    _skip_extra_on_torch_nn(rf, spec)
    sizes = dict(T=12, B=5, I=9, H=H, P=H // 2 if spec.proj else 0)
    check_layer(rf, spec, device, dtype, num_layers=2, bidirectional=True, batch_first=True,
                bias=True, layout=layout, hx_given=True, sizes=sizes)


# (B, H, I): AVX2's 8 lanes hold B * H <= 8 units and B * I <= 16 inputs, AVX-512's 16 and 32.
TINY_SIZES = [(3, 2, 3), (5, 3, 3), (2, 7, 3), (4, 2, 3), (3, 9, 3), (2, 16, 3), (1, 4, 3),
              (1, 4, 30), (2, 5, 12), (2, 4, 8)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_bias_gradients_summed_in_the_reverse_loop(rf, device, spec, layout, dtype):
    """Gate gradients of 2^16 values and more (T * B * G): the CPU engine sums the bias
    gradients as its threads write the gate gradients, not in a pass after the loop."""
    _skip_extra_on_torch_nn(rf, spec)
    sizes = dict(T=32, B=16, I=9, H=128, P=32 if spec.proj else 0)
    check_layer(rf, spec, device, dtype, num_layers=1, bidirectional=True, batch_first=True,
                bias=True, layout=layout, hx_given=True, sizes=sizes)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("sizes", [dict(T=12, B=5, I=9, H=17), dict(T=9, B=3, I=20, H=160),
                                   dict(T=4, B=20, I=7, H=33)], ids=["tiled", "blas", "rows"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_batch_first_inference(rf, device, spec, sizes, bidirectional):
    """Under no_grad the CPU engine projects a batch_first input as it comes (xg in batch-major
    rows, no time-major copy): the outputs are torch.nn's, at hidden sizes without gate packing,
    in the kernels of the recurrent product (tiled, the BLAS in unit slices, rows per thread)."""
    _skip_extra_on_torch_nn(rf, spec)
    dtype = torch.float32
    sizes = dict(sizes, P=sizes["H"] // 2 if spec.proj else 0)
    check_layer_no_grad(rf, spec, device, dtype, num_layers=1, bidirectional=bidirectional,
                        batch_first=True, bias=True, layout="batched", hx_given=True, sizes=sizes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_batch_first_training_on_the_input_as_it_comes(rf, device, spec, bidirectional, hx_given,
                                                       dtype):
    """A batch_first input of 64 KiB or more, with GEMMs per batch row of 2^20 multiply-adds or
    more, trains as it comes, with no time-major copy for the graph to keep: the CPU engine runs the input projection and the gradients of the input and
    of W_ih as a GEMM per batch row. Outputs and every gradient are torch.nn's, with a second
    layer (whose input is the first's time-major output), and the input's gradient comes back
    in the input's own batch-major layout."""
    _skip_extra_on_torch_nn(rf, spec)
    # 24576 values; a batch row's GEMM of 64 x 128 x G, G >= 128
    sizes = dict(T=64, B=3, I=128, H=128, P=64 if spec.proj else 0)
    check_layer(rf, spec, device, dtype, num_layers=2, bidirectional=bidirectional,
                batch_first=True, bias=True, layout="batched", hx_given=hx_given, sizes=sizes)
    if device.type == "cpu":
        cfg, leaves, _ = layer_case(spec, num_layers=1, bidirectional=bidirectional,
                                    batch_first=True, bias=True, layout="batched",
                                    hx_given=False, dtype=dtype, sizes=sizes)
        x = leaves["input"].requires_grad_()
        (grad,) = torch.autograd.grad(rnnfast_layer(rf, spec, cfg, dtype, device)(x)[0].sum(), x)
        assert grad.is_contiguous()


# Packed sequences need two rows or more (lengths to vary).
@pytest.mark.parametrize("B,H,I,layout", [(B, H, I, layout) for B, H, I in TINY_SIZES
                                          for layout in ("batched", "packed")
                                          if B > 1 or layout == "batched"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("spec", STANDARD, ids=str)
def test_tiny_layers_over_many_steps(rf, device, spec, B, H, I, hx_given, layout):
    """Batches and sizes whose steps fit in a few vector registers (the CPU engine's register
    product and register layer, float32): inputs of up to one and two registers, outputs of
    one to several vectors, plain and gate-packed rows, in both directions; and inputs too wide
    for the register layer's reverse pass, which then runs the general one."""
    sizes = dict(T=40, B=B, I=I, H=H, P=H - 1 if spec.proj else 0)
    check_layer(rf, spec, device, torch.float32, num_layers=1, bidirectional=True,
                batch_first=True, bias=True, layout=layout, hx_given=hx_given, sizes=sizes)


@pytest.mark.parametrize("B,H,I", [(3, 2, 3), (2, 4, 8), (2, 5, 3)])
@pytest.mark.parametrize("spec", EXTRAS, ids=str)
def test_tiny_layers_of_keras_activations(rf, device, spec, B, H, I):
    """The Keras activations (sigmoid Elman, relu and sigmoid LSTM) on batches whose steps fit
    in vector registers: the CPU engine's register layer on 256-bit registers (at most 8 units
    and 16 inputs, AVX-512) and on 512-bit ones (10 units)."""
    sizes = dict(T=40, B=B, I=I, H=H, P=H - 1 if spec.proj else 0)
    check_layer(rf, spec, device, torch.float32, num_layers=1, bidirectional=True,
                batch_first=True, bias=True, layout="batched", hx_given=True, sizes=sizes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("sizes", [dict(T=6, B=9, I=7, H=5), dict(T=5, B=14, I=4, H=3)],
                         ids=["9x5", "14x3"])
@pytest.mark.parametrize("spec", STANDARD, ids=str)
def test_gate_packed_rows_beyond_the_register_product(rf, device, spec, sizes, hx_given, dtype):
    """Hidden sizes under a vector's lanes, with more batch rows than the register product
    takes (B * H over 32): the CPU engine's gate-packed per-step products, forward and
    backward, run four batch rows at a time, and 9 and 14 rows leave one and two over.
    Outputs and all gradients are torch.nn's, through two bidirectional layers."""
    sizes = dict(sizes, P=sizes["H"] - 1 if spec.proj else 0)
    check_layer(rf, spec, device, dtype, num_layers=2, bidirectional=True, batch_first=False,
                bias=True, layout="batched", hx_given=hx_given, sizes=sizes)


@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("spec", STANDARD, ids=str)
def test_large_weights_over_many_steps(rf, device, spec, hx_given):
    """Recurrent weights too large for the CPU engine's tiled kernel (over 64K elements), a
    batch and enough steps for the forward to multiply by MKL's packed copy of W_hh, and the
    backward's products in the BLAS."""
    sizes = dict(T=100, B=8, I=20, H=160, P=80 if spec.proj else 0)
    check_layer(rf, spec, device, torch.float32, num_layers=1, bidirectional=False,
                batch_first=True, bias=True, layout="batched", hx_given=hx_given, sizes=sizes)


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("spec", STANDARD, ids=str)
def test_large_weights_and_batch_on_two_threads(rf, device, spec, hx_given, layout):
    """Products in the BLAS with a batch wide enough for the CPU engine to split each step's
    pointwise pass over two threads (40 rows: past the forward's gate panels where the BLAS
    is MKL on an Intel CPU), in both directions. Against torch.nn computed in float64."""
    # W_hh past the tiled kernel's 64K elements: [3 H or 4 H, H or P], and Elman's [H, H].
    sizes = dict(T=6, B=40, I=8, H=260 if spec.mode == "RNN" else 160,
                 P=150 if spec.proj else 0)
    with torch_threads(2):
        check_layer(rf, spec, device, torch.float32, num_layers=1, bidirectional=True,
                    batch_first=True, bias=True, layout=layout, hx_given=hx_given, sizes=sizes,
                    make_expected=lambda cfg: expected_layer_in_float64(spec, cfg))


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("spec", [s for s in STANDARD if not s.proj], ids=str)
def test_large_weights_and_batch_without_bias(rf, device, spec, hx_given, layout):
    """The products in the BLAS of the test above, without biases: the LSTM's and Elman's steps
    sum h W_hh^T into the input projection's rows and the cell adds a row of zeros for the bias.
    In float64 (the BLAS's double GEMM; torch.nn's float32 LSTM there, oneDNN's, has given
    outputs 1.3e-5 apart on the same inputs from one process to the next)."""
    sizes = dict(T=6, B=40, I=8, H=260 if spec.mode == "RNN" else 160, P=0)
    with torch_threads(2):
        check_layer(rf, spec, device, torch.float64, num_layers=1, bidirectional=True,
                    batch_first=True, bias=False, layout=layout, hx_given=hx_given, sizes=sizes)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if not s.proj], ids=str)
def test_large_weights_in_gate_panels(rf, device, spec, layout, dtype, hx_given, threads):
    """Products past the tiled kernel's 64K elements with a batch of at most 32 rows over 4
    steps or more: the CPU engine's forward packs W_hh in panels of a vector of units of every
    gate (csrc/cpu/gate_panels.h) and runs each tile of the product straight into the cell
    math, the threads splitting the panels with one barrier a step. 13 rows make uneven row
    tiles; hidden sizes end in a partial vector (150 = 9 x 16 + 6, 270); both directions, a
    second layer, zero or given initial states, one thread or two."""
    _skip_extra_on_torch_nn(rf, spec)
    # W_hh: [4 H or 3 H, H], and Elman's [H, H].
    sizes = dict(T=12, B=13, I=7, H=270 if spec.mode == "RNN" else 150)
    with torch_threads(threads):
        check_layer(rf, spec, device, dtype, num_layers=2, bidirectional=True,
                    batch_first=True, bias=True, layout=layout, hx_given=hx_given, sizes=sizes)


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("hidden", [258, 271], ids=["even", "odd"])
@pytest.mark.parametrize("spec", [s for s in STANDARD if s.mode == "RNN"], ids=str)
def test_elman_gate_panels_of_either_parity(rf, device, spec, hidden, layout):
    """The Elman forward in gate panels runs its one gate as two of H / 2 units where H is
    even (each panel's tile holds two vectors of units, j .. and H / 2 + j ..; 129 units a half
    end in a partial vector) and as one gate where H is odd, on two threads, both directions."""
    sizes = dict(T=7, B=11, I=6, H=hidden)
    with torch_threads(2):
        check_layer(rf, spec, device, torch.float32, num_layers=1, bidirectional=True,
                    batch_first=True, bias=True, layout=layout, hx_given=True, sizes=sizes)


# Hidden sizes per cell whose W_hh is past the tiled kernel's 64K elements.
PANEL_HIDDEN = {"LSTM": (200, 300), "GRU": (200, 300), "RNN": (300, 400)}


@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("case", [dict(T=9, B=8, I=37, which=0), dict(T=6, B=20, I=64, which=1),
                                  dict(T=7, B=5, I=20, which=1)], ids=["8x37", "20x64", "5x20"])
@pytest.mark.parametrize("spec", [s for s in STANDARD if not s.proj], ids=str)
def test_input_projected_in_gate_panels(rf, device, spec, case, hx_given, layout, grad):
    """From 8 batch rows, where each thread's share of [W_ih | W_hh] fits in half of its core's
    cache, the CPU engine's LSTM and Elman forward project the input in the gate panels' tiles
    (x_t W_ih^T + h W_hh^T, no GEMM over all steps): inputs of a partial and of whole cache
    lines of terms, batch-major (no_grad) and time-major rows, both directions, two layers.
    The GRU's panels, the LSTM's with AVX2 (tiles in two passes) and all cells' under 8 rows
    take h alone; from zero states the first step's tile of W_hh's several chunks of terms is
    the bias alone. Outputs, and in training every gradient, are torch.nn's."""
    sizes = dict(T=case["T"], B=case["B"], I=case["I"], H=PANEL_HIDDEN[spec.mode][case["which"]])
    check = check_layer if grad else check_layer_no_grad
    with torch_threads(2):
        check(rf, spec, device, torch.float32, num_layers=2, bidirectional=True, batch_first=True,
              bias=True, layout=layout, hx_given=hx_given, sizes=sizes)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("batch", [16, 21])
@pytest.mark.parametrize("spec", [s for s in STANDARD if not s.proj and s.mode != "RNN"], ids=str)
def test_gate_panels_split_over_batch_rows(rf, device, spec, batch, hx_given, layout, grad,
                                           threads):
    """From 16 batch rows, where the steps read the input's projection (the GRU's; the LSTM's
    over an input too wide for [W_ih | W_hh] to fit in a core's cache) and all of W_hh's panels
    fit in one core's cache, the CPU engine's forward gives each thread a share of the batch
    rows over all panels (21 rows: shares of 11 and 10). As rows of a packed sequence end, a
    share's active rows shrink on their own. Outputs, and in training every gradient, are
    torch.nn's, both directions, two layers, on one thread and two."""
    sizes = dict(T=6, B=batch, I=1100 if spec.mode == "LSTM" else 40, H=150)
    check = check_layer if grad else check_layer_no_grad
    with torch_threads(threads):
        check(rf, spec, device, torch.float32, num_layers=2, bidirectional=True, batch_first=True,
              bias=True, layout=layout, hx_given=hx_given, sizes=sizes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [s for s in ALL_SPECS if not s.proj], ids=str)
def test_single_row_products_in_gate_panels(rf, device, spec, dtype):
    """One batch row whose per-step products the tiled kernel would run (48K to 64K
    multiply-adds, where the AVX2 and the AVX-512 copies both take them): the CPU engine splits
    their units over the threads in gate panels (the backward's too with AVX2), where each tile
    of one row runs its terms as interleaved partial sums."""
    _skip_extra_on_torch_nn(rf, spec)
    # W_hh: [4 x 120, 120], [3 x 140, 140], [240, 240].
    sizes = dict(T=9, B=1, I=5, H={"LSTM": 120, "GRU": 140, "RNN": 240}[spec.mode])
    with torch_threads(2):
        check_layer(rf, spec, device, dtype, num_layers=1, bidirectional=True,
                    batch_first=True, bias=True, layout="batched", hx_given=True, sizes=sizes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [s for s in STANDARD if not s.proj], ids=str)
def test_single_row_over_large_weights_in_gate_panels(rf, device, spec, dtype):
    """One batch row over a W_hh of 4 MiB or more (past the L2 caches): the backward's product
    runs in gate panels with AVX-512 too, and the forward's and the backward's threads take
    their panels in reverse order every other step."""
    # W_hh: [4 x 512, 512], [3 x 600, 600], [1024, 1024] (float32: 4 - 4.1 MiB).
    sizes = dict(T=5, B=1, I=6, H={"LSTM": 512, "GRU": 600, "RNN": 1024}[spec.mode])
    with torch_threads(2):
        check_layer(rf, spec, device, dtype, num_layers=1, bidirectional=True,
                    batch_first=True, bias=True, layout="batched", hx_given=True, sizes=sizes)


# relu's: of the 10^5 pre-activations of 13 rows x 1024 units x 4 steps x 2 directions, some lie
# within float32 rounding of 0, where either side's rounding flips the unit's derivative.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("spec", [s for s in STANDARD if not s.proj and s.act != "relu"],
                         ids=str)
def test_row_tiles_over_large_weights_in_gate_panels(rf, device, spec, layout, threads):
    """13 batch rows over a W_hh of 4 MiB or more (past a core's L2 cache): the row tiles after
    a chunk's first fetch the next chunk of the panel (or the next panel's first) while they
    run, in the forward's panels and the backward's, in both step orders and as a packed
    sequence's rows end. Outputs and every gradient are torch.nn's (not relu's, above)."""
    # W_hh: [4 x 512, 512], [3 x 600, 600], [1024, 1024] (float32: 4 - 4.1 MiB).
    sizes = dict(T=4, B=13, I=6, H={"LSTM": 512, "GRU": 600, "RNN": 1024}[spec.mode])
    with torch_threads(threads):
        check_layer(rf, spec, device, torch.float32, num_layers=1, bidirectional=True,
                    batch_first=True, bias=True, layout=layout, hx_given=True, sizes=sizes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", range(1, 18))
def test_gate_panel_row_tiles_of_every_batch(rf, device, batch, dtype):
    """The LSTM forward in gate panels for every batch of 1 to 17 rows: GatePanels::row_tiles
    cuts them into tiles of 1 to 6 rows, which with AVX2 are tiles of 3 rows x 4 gates and
    tiles of 4 or 5 rows that run their gates in two passes (16 rows: 3 + 3 + 5 + 5)."""
    sizes = dict(T=5, B=batch, I=7, H=150)
    check_layer(rf, Spec("LSTM", "LSTM"), device, dtype, num_layers=1, bidirectional=False,
                batch_first=True, bias=True, layout="batched", hx_given=True, sizes=sizes)


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "no-hx"])
@pytest.mark.parametrize("spec", STANDARD, ids=str)
def test_few_long_rows_times_weights_as_stored(rf, device, spec, hx_given, layout):
    """Forward products of 8 to 16 rows and 200 or more terms (as in the course's 2-layer
    energy models), which the CPU engine runs on W_ih, W_hh and W_hr as stored: the input
    projection of 2 steps x 8 rows, the recurrent and projection products of 8 rows; outputs
    ending in a partial block of 8 columns, terms ending in a partial vector, in both
    directions and with a second layer."""
    sizes = dict(T=2, B=8, I=203, H=205, P=201 if spec.proj else 0)
    check_layer(rf, spec, device, torch.float32, num_layers=2, bidirectional=True,
                batch_first=True, bias=True, layout=layout, hx_given=hx_given, sizes=sizes)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [8, 17, 64])
@pytest.mark.parametrize("spec", CELL_STANDARD + CELL_EXTRAS, ids=str)
def test_cell_larger_sizes(rf, device, spec, H, dtype):
    _skip_extra_on_torch_nn(rf, spec)
    check_cell(rf, spec, device, dtype, bias=True, unbatched=False, hx_given=True,
               sizes=dict(B=5, I=9, H=H))


def _two_layer_bidirectional_pair(rf, spec, device, sizes=None, layout="batched"):
    """(expected module, rnnfast's with its state dict, leaves with h0 / c0, lengths or None) of
    2 bidirectional layers in float64, time-major, with biases."""
    dtype = torch.float64
    cfg, leaves, lengths = layer_case(spec, num_layers=2, bidirectional=True, batch_first=False,
                                      bias=True, layout=layout, hx_given=True, dtype=dtype,
                                      sizes=sizes)
    expected = expected_layer(spec, cfg, dtype)
    actual = rnnfast_layer(rf, spec, cfg, dtype, device)
    actual.load_state_dict(expected.state_dict(), strict=True)
    return expected, actual, leaves, lengths


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_non_contiguous_inputs(rf, device, spec):
    """A transposed input and strided slices of larger tensors as h0/c0."""
    _skip_extra_on_torch_nn(rf, spec)
    expected, actual, leaves, _ = _two_layer_bidirectional_pair(
        rf, spec, device, dict(T=5, B=3, I=4, H=5, P=2 if spec.proj else 0))
    call = layer_call(spec.mode == "LSTM", None, False)
    exp, _, _ = evaluate(expected, CPU, leaves, call)

    def strided(t):
        """The same values, as a non-contiguous view on `device`."""
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=device)
        big[..., ::2] = t.to(device)
        view = big[..., ::2]
        assert not view.is_contiguous()
        return view

    x = leaves["input"].transpose(0, 1).contiguous().to(device).transpose(0, 1)  # (T, B, I) view
    assert not x.is_contiguous()
    h0 = strided(leaves["h0"])
    hx = (h0, strided(leaves["c0"])) if spec.mode == "LSTM" else h0
    out, hn = actual(x, hx)
    assert_close_rel(out, exp["output"], "output")
    if spec.mode == "LSTM":
        assert_close_rel(hn[0], exp["h_n"], "h_n")
        assert_close_rel(hn[1], exp["c_n"], "c_n")
    else:
        assert_close_rel(hn, exp["h_n"], "h_n")


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_parameter_updates_are_seen(rf, device, spec):
    """In-place parameter updates (an optimizer step), load_state_dict and
    reassignment after a first forward are used by the next forward (no stale
    cached or repacked weights)."""
    _skip_extra_on_torch_nn(rf, spec)
    dtype = torch.float64
    cfg, leaves, _ = layer_case(spec, num_layers=2, bidirectional=True, batch_first=False,
                                bias=True, layout="batched", hx_given=False, dtype=dtype)
    expected = expected_layer(spec, cfg, dtype)
    actual = rnnfast_layer(rf, spec, cfg, dtype, device)
    actual.load_state_dict(expected.state_dict(), strict=True)
    call = layer_call(spec.mode == "LSTM", None, False)
    evaluate(actual, device, leaves, call)  # first forward/backward

    # 1. an optimizer step on both
    for m in (expected, actual):
        torch.manual_seed(7)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn(p.shape, dtype=dtype).to(p.device))
    exp, _, w = evaluate(expected, CPU, leaves, call)
    got, _, _ = evaluate(actual, device, leaves, call, w)
    compare_results(got, exp, "after an in-place update: ")

    # 2. load_state_dict of other values
    other = expected_layer(spec, cfg, dtype)
    actual.load_state_dict(other.state_dict())
    exp, _, w = evaluate(other, CPU, leaves, call)
    got, _, _ = evaluate(actual, device, leaves, call, w)
    compare_results(got, exp, "after load_state_dict: ")

    # 3. a parameter replaced by a new nn.Parameter
    with torch.no_grad():
        new = torch.randn_like(other.weight_hh_l1)
        other.weight_hh_l1 = nn.Parameter(new.clone())
        actual.weight_hh_l1 = nn.Parameter(new.clone().to(device))
    exp, _, w = evaluate(other, CPU, leaves, call)
    got, _, _ = evaluate(actual, device, leaves, call, w)
    compare_results(got, exp, "after replacing weight_hh_l1: ")


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_parametrized_and_pruned_weights(rf, device, spec):
    """weight_norm on weight_hh_l0 and pruning of weight_ih_l1 (each replaces the parameter
    with an attribute computed from others) on both sides: the same outputs and gradients of
    the underlying parameters."""
    _skip_extra_on_torch_nn(rf, spec)
    # weight_hh_l0 rows of 2+ values (weight_norm's gradient of a one-value row's direction
    # is zero, up to rounding).
    expected, actual, leaves, _ = _two_layer_bidirectional_pair(
        rf, spec, device, dict(T=4, B=3, I=3, H=5, P=3 if spec.proj else 0))
    for m in (expected, actual):
        nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
        torch.nn.utils.prune.l1_unstructured(m, "weight_ih_l1", amount=0.4)
    call = layer_call(spec.mode == "LSTM", None, False)
    exp, _, w = evaluate(expected, CPU, leaves, call)
    got, _, _ = evaluate(actual, device, leaves, call, w)
    assert "grad_parametrizations.weight_hh_l0.original0" in got
    assert "grad_weight_ih_l1_orig" in got
    compare_results(got, exp)


def _check_cpp_forward_equals_python(monkeypatch, entry, expected, actual, device, leaves, call):
    """actual's results and gradients with its C++ forward (entry answering the one call) and
    with its Python forward (entry declining): bit for bit the same, and expected's to the
    tolerance."""
    exp, _, w = evaluate(expected, CPU, leaves, call)
    results = {}
    for enabled in (True, False):
        with monkeypatch.context() as patch:
            answered = count_cpp_forward_calls(patch, enabled, entry)
            results[enabled], _, _ = evaluate(actual, device, leaves, call, w)
        assert len(answered) == (1 if enabled else 0), f"{entry} answered {answered}"
    compare_results(results[True], exp)
    for key, value in results[False].items():
        assert torch.equal(results[True][key], value), f"{key}: the two forwards differ"


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("hx_given", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_one_direction_forward_in_cpp_equals_the_python_forward(rf, device, spec, batch_first,
                                                                hx_given, bias, num_layers,
                                                                monkeypatch):
    """A one-direction module's forward runs in C++ (_C.plain_layers) where its arguments are
    the plain case: bit for bit the results and gradients of its Python forward, and torch.nn's
    (or the reference's) to the tolerance."""
    _check_one_direction_forward_in_cpp(rf, device, spec, batch_first, hx_given, bias,
                                        num_layers, 0.0, monkeypatch)


@pytest.mark.parametrize("spec", STANDARD, ids=str)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("hx_given", [False, True])
def test_one_direction_forward_in_cpp_with_dropout(rf, device, spec, batch_first, hx_given,
                                                   monkeypatch):
    """The same in training with dropout between three layers: from the same seed, the masks
    of torch.nn and of the Python forward."""
    _check_one_direction_forward_in_cpp(rf, device, spec, batch_first, hx_given, True, 3, 0.4,
                                        monkeypatch)


def _check_one_direction_forward_in_cpp(rf, device, spec, batch_first, hx_given, bias,
                                        num_layers, dropout, monkeypatch):
    if getattr(rf, "IS_TORCH_NN", False):
        pytest.skip("rnnfast's own forward paths")
    dtype = torch.float64
    cfg, leaves, _ = layer_case(spec, num_layers=num_layers, bidirectional=False,
                                batch_first=batch_first, bias=bias, layout="batched",
                                hx_given=hx_given, dtype=dtype, dropout=dropout)
    expected = expected_layer(spec, cfg, dtype)
    actual = rnnfast_layer(rf, spec, cfg, dtype, device)
    actual.load_state_dict(expected.state_dict(), strict=True)
    unseeded = layer_call(spec.mode == "LSTM", None, batch_first)
    seed = torch.randint(0, 2**31, ()).item()

    def call(module, values):
        torch.manual_seed(seed)  # the same dropout masks in each of the three forwards
        return unseeded(module, values)

    _check_cpp_forward_equals_python(monkeypatch, "plain_layers", expected, actual, device,
                                     leaves, call)


@pytest.mark.parametrize("spec", STANDARD, ids=str)
@pytest.mark.parametrize("layout", ["batched", "packed"])
def test_initial_state_without_gradient(rf, device, spec, layout):
    """An initial state that needs no gradient (a carried, detached state; explicit zeros): the
    backward skips its gradient's product, and every other gradient is torch.nn's, and bit for
    bit the one of the same call whose state asks for its gradient."""
    expected, actual, leaves, lengths = _two_layer_bidirectional_pair(rf, spec, device,
                                                                      layout=layout)
    is_lstm = spec.mode == "LSTM"
    call = layer_call(is_lstm, lengths, False)

    def without_state_grad(module, values):
        x = values["input"]
        if lengths is not None:
            x = pack_padded_sequence(x, lengths, enforce_sorted=False)
        states = {k: values[k].detach() for k in ("h0", "c0") if k in values}
        hx = (states["h0"], states["c0"]) if is_lstm else states["h0"]
        output, h_n = module(x, hx)
        output = output.data if lengths is not None else output
        outs = {"output": output}
        if is_lstm:
            outs["h_n"], outs["c_n"] = h_n
        else:
            outs["h_n"] = h_n
        return outs, None

    exp, _, w = evaluate(expected, CPU, leaves, without_state_grad)
    got, _, _ = evaluate(actual, device, leaves, without_state_grad, w)
    assert got.pop("grad_h0") is None and exp.pop("grad_h0") is None
    if is_lstm:
        assert got.pop("grad_c0") is None and exp.pop("grad_c0") is None
    compare_results(got, exp)
    with_grad, _, _ = evaluate(actual, device, leaves, call, w)
    for key, value in got.items():
        assert torch.equal(value, with_grad[key]), f"{key} differs"


@pytest.mark.parametrize("spec", STANDARD, ids=str)
def test_one_layer_forward_declines_what_python_handles(rf, device, spec, monkeypatch):
    """What the C++ forward of one-layer modules leaves to the Python forward: a weight that
    weight_norm computes, unbatched and packed inputs, a dtype or a state shape that torch.nn
    refuses (with its error), and modules with cell options. Each gives torch.nn's results or
    error."""
    if getattr(rf, "IS_TORCH_NN", False):
        pytest.skip("rnnfast's own forward paths")
    dtype = torch.float64
    is_lstm = spec.mode == "LSTM"
    sizes = dict(T=4, B=3, I=3, H=5, P=3 if spec.proj else 0)
    cfg, leaves, _ = layer_case(spec, num_layers=1, bidirectional=False, batch_first=False,
                                bias=True, layout="batched", hx_given=True, dtype=dtype,
                                sizes=sizes)
    expected = expected_layer(spec, cfg, dtype)
    actual = rnnfast_layer(rf, spec, cfg, dtype, device)
    actual.load_state_dict(expected.state_dict(), strict=True)
    answered = count_cpp_forward_calls(monkeypatch, enabled=True)
    call = layer_call(is_lstm, None, False)

    for m in (expected, actual):
        nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
    exp, _, w = evaluate(expected, CPU, leaves, call)
    got, _, _ = evaluate(actual, device, leaves, call, w)
    compare_results(got, exp, "weight_norm: ")
    assert answered == [], "a parametrized weight must take the Python forward"
    nn.utils.parametrize.remove_parametrizations(actual, "weight_hh_l0")

    unbatched = {"input": leaves["input"][:, 0]}
    unbatched.update({k: leaves[k][:, 0] for k in ("h0", "c0") if k in leaves})
    nn.utils.parametrize.remove_parametrizations(expected, "weight_hh_l0")
    exp, _, w = evaluate(expected, CPU, unbatched, call)
    got, _, _ = evaluate(actual, device, unbatched, call, w)
    compare_results(got, exp, "unbatched: ")

    lengths = torch.tensor([4, 2, 3])
    packed_call = layer_call(is_lstm, lengths, False)
    exp, exp_meta, w = evaluate(expected, CPU, leaves, packed_call)
    got, got_meta, _ = evaluate(actual, device, leaves, packed_call, w)
    compare_results(got, exp, "packed: ")
    compare_meta(got_meta, exp_meta)
    assert answered == [], f"unbatched and packed inputs must take the Python forward: {answered}"

    x = leaves["input"].to(device)
    h0 = leaves["h0"].to(device)
    wrong_state = h0[:, :2]
    hx = (wrong_state, leaves["c0"].to(device)) if is_lstm else wrong_state
    with pytest.raises(RuntimeError, match=r"Expected hidden(\[0\])? size \(1, 3, \d\), got \[1, 2, \d\]"):
        actual(x, hx)
    with pytest.raises(ValueError, match=r"RNN input dtype \(torch.float32\) does not match weight dtype"):
        actual(x.float())
    assert answered == []

    options = getattr(rf, spec.mode)(3, 5, zoneout=0.5, dtype=dtype).to(device).eval()
    options(x)
    assert answered == [], "a module with cell options must take the Python forward"
    actual(x)
    assert len(answered) == 1


@pytest.mark.parametrize("spec", CELL_STANDARD + CELL_EXTRAS, ids=str)
@pytest.mark.parametrize("hx_given", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_forward_in_cpp_equals_the_python_forward(rf, device, spec, hx_given, bias,
                                                       monkeypatch):
    """A cell's step runs in C++ (_C.single_step) where its arguments are the plain case: bit
    for bit the results and gradients of its Python forward, and torch.nn's (or the
    reference's) to the tolerance."""
    if getattr(rf, "IS_TORCH_NN", False):
        pytest.skip("rnnfast's own forward paths")
    dtype = torch.float64
    cfg = dict(input_size=rand_int(1, 4), hidden_size=rand_int(1, 5), bias=bias)
    leaves = {"input": torch.randn(rand_int(1, 4), cfg["input_size"], dtype=dtype)}
    if hx_given:
        leaves["h0"] = torch.randn(leaves["input"].size(0), cfg["hidden_size"], dtype=dtype)
        if spec.mode == "LSTM":
            leaves["c0"] = torch.randn_like(leaves["h0"])
    expected = expected_cell(spec, cfg, dtype)
    actual = rnnfast_cell(rf, spec, cfg, dtype, device)
    actual.load_state_dict(expected.state_dict(), strict=True)
    call = cell_call(spec.mode == "LSTM")
    _check_cpp_forward_equals_python(monkeypatch, "single_step", expected, actual, device,
                                     leaves, call)


@pytest.mark.parametrize("spec", CELL_STANDARD, ids=str)
def test_cell_forward_declines_what_python_handles(rf, device, spec, monkeypatch):
    """What the C++ step of cells leaves to the Python forward: weights that weight_norm or
    pruning compute, unbatched input, a state shape or dtype that torch.nn refuses (with its
    error), cell options. Each gives torch.nn's results or error."""
    if getattr(rf, "IS_TORCH_NN", False):
        pytest.skip("rnnfast's own forward paths")
    dtype = torch.float64
    is_lstm = spec.mode == "LSTM"
    cfg = dict(input_size=3, hidden_size=4, bias=True)
    leaves = {"input": torch.randn(2, 3, dtype=dtype), "h0": torch.randn(2, 4, dtype=dtype)}
    if is_lstm:
        leaves["c0"] = torch.randn(2, 4, dtype=dtype)
    expected = expected_cell(spec, cfg, dtype)
    actual = rnnfast_cell(rf, spec, cfg, dtype, device)
    actual.load_state_dict(expected.state_dict(), strict=True)
    answered = count_cpp_forward_calls(monkeypatch, True, "single_step")
    call = cell_call(is_lstm)

    for m in (expected, actual):
        nn.utils.parametrizations.weight_norm(m, "weight_hh")
        torch.nn.utils.prune.l1_unstructured(m, "weight_ih", amount=0.4)
    exp, _, w = evaluate(expected, CPU, leaves, call)
    got, _, _ = evaluate(actual, device, leaves, call, w)
    compare_results(got, exp, "weight_norm and pruning: ")
    assert answered == [], "computed weights must take the Python forward"

    plain = rnnfast_cell(rf, spec, cfg, dtype, device)
    reference = expected_cell(spec, cfg, dtype)
    plain.load_state_dict(reference.state_dict(), strict=True)
    unbatched = {k: v[0] for k, v in leaves.items()}
    exp, _, w = evaluate(reference, CPU, unbatched, call)
    got, _, _ = evaluate(plain, device, unbatched, call, w)
    compare_results(got, exp, "unbatched: ")
    assert answered == [], "unbatched input must take the Python forward"

    x = leaves["input"].to(device)
    h = leaves["h0"].to(device)
    wrong = h[:1]
    hx = (wrong, leaves["c0"].to(device)) if is_lstm else wrong
    with pytest.raises(RuntimeError, match=r"Input batch size 2 doesn't match hidden0 batch size 1"):
        plain(x, hx)
    with pytest.raises(RuntimeError, match=r"must have the dtype of"):
        plain(x.float())
    assert answered == []

    options = getattr(rf, spec.mode + "Cell")(3, 4, zoneout=0.5, dtype=dtype).to(device).eval()
    options(x)
    assert answered == [], "a cell with options must take the Python forward"
    plain(x)
    assert len(answered) == 1


@pytest.mark.parametrize("spec", CELL_STANDARD + CELL_EXTRAS, ids=str)
def test_parametrized_cell_weights(rf, device, spec):
    _skip_extra_on_torch_nn(rf, spec)
    dtype = torch.float64
    cfg = dict(input_size=3, hidden_size=4)
    expected = expected_cell(spec, cfg, dtype)
    actual = rnnfast_cell(rf, spec, cfg, dtype, device)
    actual.load_state_dict(expected.state_dict(), strict=True)
    for m in (expected, actual):
        nn.utils.parametrizations.weight_norm(m, "weight_hh")
    x = torch.randn(2, 3, dtype=dtype)
    loss_w = torch.randn(2, 4, dtype=dtype)
    results = []
    for m, dev in ((expected, CPU), (actual, device)):
        h = m(x.to(dev))
        h = h[0] if isinstance(h, tuple) else h
        grads = torch.autograd.grad((h * loss_w.to(dev)).sum(), list(m.parameters()))
        results.append([h, *grads])
    for got, want in zip(results[1], results[0]):
        assert_close_rel(got, want, "cell with weight_norm")


@pytest.mark.parametrize("spec", ALL_SPECS, ids=str)
def test_deepcopy(rf, device, spec):
    _skip_extra_on_torch_nn(rf, spec)
    cfg = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    if spec.mode == "LSTM":
        cfg["proj_size"] = 2 if spec.proj else 0
    a = rnnfast_layer(rf, spec, cfg, torch.float64, device)
    b = copy.deepcopy(a)
    x = torch.randn(5, 2, 3, dtype=torch.float64, device=device)
    assert_close_rel(b(x)[0], a(x)[0], "output of the copy")
    with torch.no_grad():
        b.weight_ih_l0.zero_()
    assert not torch.equal(a.weight_ih_l0, b.weight_ih_l0), "the copy shares parameters"
