"""Reliability of the CPU engine beyond the usual tolerances: non-finite values propagate as
torch.nn's do, sums over many rows keep torch.nn's accuracy, long inference calls stay within
torch.nn's memory, and results do not depend on the thread count."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import rnnfast
from cpu_features import runs_bf16_dot_products
from thread_count import torch_threads

# (rnnfast class, torch.nn class, keyword arguments): every layer and cell type.
LAYERS = [
    ("LSTM", {}),
    ("GRU", {}),
    ("RNN", {"nonlinearity": "tanh"}),
    ("RNN", {"nonlinearity": "relu"}),
]
CELLS = [
    ("LSTMCell", {}),
    ("GRUCell", {}),
    ("RNNCell", {"nonlinearity": "tanh"}),
    ("RNNCell", {"nonlinearity": "relu"}),
]


def _pair(name, kwargs, *sizes, **more):
    reference = getattr(nn, name)(*sizes, **kwargs, **more)
    ours = getattr(rnnfast, name)(*sizes, **kwargs, **more)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _run(module, x, hx, grad_out, is_cell):
    """Forward and backward; returns the outputs and the gradients of the input, the given
    initial states and every parameter."""
    x = x.clone().requires_grad_()
    states = None
    if hx is not None:
        states = tuple(h.clone().requires_grad_() for h in hx) if isinstance(hx, tuple) \
            else hx.clone().requires_grad_()
    result = module(x) if states is None else module(x, states)
    if is_cell:
        outputs = list(result) if isinstance(result, tuple) else [result]
    else:
        out, final = result
        outputs = [out] + (list(final) if isinstance(final, tuple) else [final])
    loss = sum((o * g).sum() for o, g in zip(outputs, grad_out))
    inputs = [x] + ([] if states is None else
                    list(states) if isinstance(states, tuple) else [states])
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, inputs + params, allow_unused=True)
    return [o.detach() for o in outputs], list(grads)


def _non_finite_pattern(tensors):
    return [(torch.isnan(t), torch.isinf(t)) if t is not None else None for t in tensors]


def _assert_same_pattern(ours, theirs, what):
    for index, (a, b) in enumerate(zip(_non_finite_pattern(ours), _non_finite_pattern(theirs))):
        if a is None or b is None:
            assert a is None and b is None, f"{what}[{index}]: one side has no gradient"
            continue
        assert torch.equal(a[0], b[0]), f"{what}[{index}]: NaN positions differ from torch.nn"
        assert torch.equal(a[1], b[1]), f"{what}[{index}]: Inf positions differ from torch.nn"


def _parameter_names(is_cell):
    if is_cell:
        return ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    return [f"{kind}_l{layer}" for layer in (0, 1)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


# Layers over one step (the first step's product alone) and several; cells run one step.
# Batch rows per case: over 5 steps, 2 rows of 5 units run in the register layer's 512-bit
# registers and 1 row in its 256-bit ones (AVX-512); 4 rows in the other kernels.
_NON_FINITE_CASES = [(n, kw, t, b) for n, kw in LAYERS for t, b in ((1, 4), (5, 2), (5, 1))] + \
    [(n, kw, 1, 4) for n, kw in CELLS]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("given_state", [False, True], ids=["hx=None", "hx"])
@pytest.mark.parametrize("name,kwargs,steps,batch", _NON_FINITE_CASES,
                         ids=[f"{n}{kw.get('nonlinearity', '')}-T{t}-B{b}"
                              for n, kw, t, b in _NON_FINITE_CASES])
def test_non_finite_weights_propagate_as_in_torch_nn(name, kwargs, steps, batch, given_state,
                                                      value):
    is_cell = name.endswith("Cell")
    input_size, hidden = 3, 5
    extra = {} if is_cell else {"num_layers": 2}
    for parameter in _parameter_names(is_cell):
        reference, ours = _pair(name, kwargs, input_size, hidden, **extra)
        with torch.no_grad():
            weight = dict(reference.named_parameters())[parameter]
            index = tuple(torch.randint(0, size, ()).item() for size in weight.shape)
            weight[index] = value
        ours.load_state_dict(reference.state_dict())
        x = torch.randn(batch, input_size) if is_cell else torch.randn(steps, batch, input_size)
        hx = None
        layers = 1 if is_cell else 2
        if given_state:
            h = torch.randn(batch, hidden) if is_cell else torch.randn(layers, batch, hidden)
            hx = (h, torch.randn_like(h)) if name.startswith("LSTM") else h
        grad_out = _grad_outputs(reference, x, hx, is_cell)
        reference_out, reference_grads = _run(reference, x, hx, grad_out, is_cell)
        out, grads = _run(ours, x, hx, grad_out, is_cell)
        _assert_same_pattern(out, reference_out, f"{parameter}: outputs")
        _assert_same_pattern(grads, reference_grads, f"{parameter}: gradients")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["float32", "float64", "bfloat16", "float16"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name,kwargs", LAYERS, ids=[n + kw.get("nonlinearity", "")
                                                       for n, kw in LAYERS])
def test_non_finite_first_step_gradients_reach_w_hh_as_in_torch_nn(name, kwargs, value, dtype):
    """Without hx, W_hh's gradient leaves out the first step's term dgate^T h_0, which is zero,
    unless that step's gate gradients hold a NaN or an Inf (the term is then NaN, as in
    torch.nn): the scan of their bits, in every floating type."""
    torch.manual_seed(0)
    reference, ours = _pair(name, kwargs, 3, 5)
    reference.to(dtype)
    ours.to(dtype)
    x = torch.randn(4, 2, 3, dtype=dtype)
    grad_out = [torch.randn(4, 2, 5, dtype=dtype), torch.randn(1, 2, 5, dtype=dtype)]
    if name == "LSTM":
        grad_out.append(torch.randn(1, 2, 5, dtype=dtype))
    grad_out[0][0, 1, 2] = value  # the first step's output, row 1, unit 2
    _, reference_grads = _run(reference, x, None, grad_out, False)
    _, grads = _run(ours, x, None, grad_out, False)
    # W_hh's gradient, after x's and W_ih's
    assert torch.isnan(reference_grads[2]).any()
    _assert_same_pattern(grads[2:3], reference_grads[2:3], "W_hh's gradient")


@pytest.mark.parametrize("name,kwargs", LAYERS, ids=[n + kw.get("nonlinearity", "")
                                                       for n, kw in LAYERS])
def test_weights_changed_in_place_are_scanned_again(name, kwargs):
    """Whether W_hh is finite is remembered per weight tensor for a deep stack's every layer and
    direction; an in-place change of any one of them (here after the others were asked about)
    is seen on the next call: a NaN put in, then taken out, as in torch.nn."""
    reference, ours = _pair(name, kwargs, 3, 5, num_layers=3, bidirectional=True)
    x = torch.randn(1, 4, 3)  # one step: only the first step's product reads W_hh
    for parameter in ("weight_hh_l0", "weight_hh_l1_reverse", "weight_hh_l2"):
        with torch.no_grad():
            for _ in range(2):
                ours(x)  # every layer's W_hh asked about (and remembered) as finite
            for module in (reference, ours):
                dict(module.named_parameters())[parameter][0, 0] = float("nan")
            expected = reference(x)[0]
            assert torch.isnan(expected).any()
            _assert_same_pattern([ours(x)[0]], [expected], f"{parameter} NaN: output")
            for module in (reference, ours):
                dict(module.named_parameters())[parameter][0, 0] = 0.5
            torch.testing.assert_close(ours(x)[0], reference(x)[0])


def _grad_outputs(module, x, hx, is_cell):
    with torch.no_grad():
        result = module(x) if hx is None else module(x, hx)
    if is_cell:
        outputs = list(result) if isinstance(result, tuple) else [result]
    else:
        out, final = result
        outputs = [out] + (list(final) if isinstance(final, tuple) else [final])
    return [torch.randn_like(o) for o in outputs]


def test_bias_gradient_over_two_million_rows_is_accurate():
    """The bias gradient sums T * B = 2M rows of gate gradients: its error against a float64
    computation stays at torch.nn's level."""
    steps, batch, input_size, hidden = 64, 32768, 3, 32
    reference, ours = _pair("RNN", {}, input_size, hidden)
    x = torch.randn(steps, batch, input_size)
    grad_out = torch.randn(steps, batch, hidden)
    exact = reference.double()
    x64 = x.double().requires_grad_()
    out64, _ = exact(x64)
    (out64 * grad_out.double()).sum().backward()
    truth = {name: p.grad for name, p in exact.named_parameters()}
    reference.float()
    reference.zero_grad()
    out_ref, _ = reference(x)
    (out_ref * grad_out).sum().backward()
    out, _ = ours(x)
    (out * grad_out).sum().backward()
    for name in ("bias_ih_l0", "bias_hh_l0", "weight_hh_l0", "weight_ih_l0"):
        scale = truth[name].abs().max()
        ours_error = ((dict(ours.named_parameters())[name].grad.double() - truth[name]).abs()
                      .max() / scale).item()
        torch_error = ((dict(reference.named_parameters())[name].grad.double() - truth[name])
                       .abs().max() / scale).item()
        assert ours_error <= max(4 * torch_error, 1e-6), (name, ours_error, torch_error)


_PEAK_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    import rnnfast
    which, steps, batch, input_size, hidden = sys.argv[1], *map(int, sys.argv[2:])
    torch.manual_seed(0)
    module = (rnnfast.LSTM if which == "rnnfast" else torch.nn.LSTM)(input_size, hidden)
    x = torch.randn(steps, batch, input_size)
    with torch.no_grad():
        module(x[:2])  # warm up: the libraries' own allocations
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out, (h, c) = module(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_kib": after - before, "checksum": float(out.double().sum())}))
""")


def _peak_increase_kib(which, *sizes):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT, which,
                           *map(str, sizes)], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_long_inference_call_peaks_within_torch_nn_memory():
    """Under no_grad the input projection of a long sequence is not held whole: the peak of
    a call's memory stays at or below torch.nn's on the same call."""
    sizes = (1000, 64, 256, 256)  # T, B, I, H: a whole projection would be 256 MiB
    ours = _peak_increase_kib("rnnfast", *sizes)
    theirs = _peak_increase_kib("torch", *sizes)
    output_kib = sizes[0] * sizes[1] * sizes[3] * 4 // 1024
    assert ours["peak_kib"] <= max(theirs["peak_kib"], output_kib) * 1.1, (ours, theirs)


@pytest.mark.parametrize("batch_first,hx_given", [(False, False), (True, True)],
                         ids=["time-major-hx=None", "batch_first-hx"])
def test_chunked_inference_equals_the_training_forward(batch_first, hx_given):
    """A long inference call (its input projection made in chunks of steps: 32 MiB, here 64 to
    256 steps of 2048 rows) gives the training forward's outputs bit for bit, both directions,
    and torch.nn's within float tolerance."""
    steps, batch, input_size, hidden = 300, 2048, 8, 16
    for name, kwargs in LAYERS:
        reference, ours = _pair(name, kwargs, input_size, hidden, bidirectional=True,
                                batch_first=batch_first)
        x = torch.randn(batch, steps, input_size) if batch_first \
            else torch.randn(steps, batch, input_size)
        h = torch.randn(2, batch, hidden) if hx_given else None
        hx = (h, torch.randn_like(h)) if hx_given and name == "LSTM" else h
        with torch.no_grad():
            out, final = ours(x, hx)
            out_ref, final_ref = reference(x, hx)
        out_train, final_train = ours(x.clone().requires_grad_(), hx)
        assert torch.equal(out, out_train.detach()), name
        finals = [final] if torch.is_tensor(final) else list(final)
        finals_train = [final_train] if torch.is_tensor(final_train) else list(final_train)
        finals_ref = [final_ref] if torch.is_tensor(final_ref) else list(final_ref)
        for ours_final, train_final, ref_final in zip(finals, finals_train, finals_ref):
            assert torch.equal(ours_final, train_final.detach()), name
            torch.testing.assert_close(ours_final, ref_final, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)


_THREAD_SHAPES = [
    # name, (T, B, I, H, layers)
    ("LSTM", (7, 3, 5, 8, 1)),
    ("GRU", (9, 4, 12, 16, 2)),
    ("RNN", (12, 16, 32, 64, 1)),
    ("LSTM", (35, 20, 200, 200, 2)),
    ("GRU", (35, 20, 200, 200, 2)),
    ("LSTM", (20, 64, 256, 256, 1)),
    ("GRU", (20, 64, 256, 256, 1)),
    ("RNN", (20, 64, 256, 256, 1)),
    ("LSTM", (10, 16, 128, 128, 1)),
    ("GRU", (12, 24, 32, 160, 1)),  # the backward's BLAS products on each thread's rows
    # The forward's gate panels split by batch rows (an input too wide for the steps to
    # project it), in shares of 9 rows.
    ("LSTM", (8, 18, 1100, 150, 1)),
    # The backward's gate panels on each thread's rows through all steps (W_hh within a core's
    # L2 cache), in shares of 9 and 8 rows, the GRU's with dh through z beside the product.
    ("GRU", (8, 17, 20, 150, 1)),
    # One batch row past the engine's own kernels: the backward's per-step products of one row
    # (row_times_matrix in csrc/cpu/blas.h), in one block of terms and in two.
    ("GRU", (20, 1, 64, 256, 1)),
    ("LSTM", (20, 1, 256, 512, 1)),
    ("RNN", (20, 1, 128, 640, 1)),
    ("GRU", (20, 1, 64, 300, 1)),  # 300 outputs: passes of 64 and a partial vector
    # Weight gradients over many more steps' rows than outputs, as two halves of their terms
    # (gemm_in_term_halves in csrc/cpu/blas.h); an odd count of rows.
    ("LSTM", (50, 16, 32, 32, 1)),
    ("GRU", (31, 7, 10, 12, 1)),
    # The forward's gate panels split by panels over an odd count of them (13 blocks of 16
    # units; Elman's 450 units as two gates of 225, 15 blocks): the threads' shares cut between
    # halves of a block's rows.
    ("LSTM", (9, 13, 20, 200, 1)),
    ("GRU", (9, 12, 20, 200, 1)),
    ("RNN", (9, 9, 30, 450, 1)),
]


# bfloat16 products past the engine's float ones (the widened product's limit), in MKL's
# bfloat16 GEMM where the CPU has no AVX512-BF16 (csrc/cpu/blas.h: gemm_with_float_sums): per-step
# products in several blocks of columns, products over all steps in blocks of rows too.
_BFLOAT16_THREAD_SHAPES = [("LSTM", (3, 20, 650, 650, 1)), ("GRU", (3, 64, 300, 500, 1))]


@pytest.mark.skipif(runs_bf16_dot_products(),
                    reason="this CPU's bfloat16 GEMMs run on its AVX512-BF16 instructions")
@pytest.mark.parametrize("name,sizes", _BFLOAT16_THREAD_SHAPES,
                         ids=[f"{n}-T{s[0]}-B{s[1]}-I{s[2]}-H{s[3]}"
                              for n, s in _BFLOAT16_THREAD_SHAPES])
def test_bfloat16_results_do_not_depend_on_the_thread_count(name, sizes):
    steps, batch, input_size, hidden, layers = sizes
    module = getattr(rnnfast, name)(input_size, hidden, num_layers=layers).bfloat16()
    x = torch.randn(steps, batch, input_size, dtype=torch.bfloat16)
    grad_out = torch.randn(steps, batch, hidden, dtype=torch.bfloat16)
    results = []
    for threads in (1, 2):
        with torch_threads(threads):
            results.append(_forward_backward(module, x, None, grad_out))
    for index, (one, two) in enumerate(zip(*results)):
        assert torch.equal(one, two), f"result {index} differs between 1 and 2 threads"


def _forward_backward(module, x, hx, grad_out):
    x = x.clone().requires_grad_()
    out, final = module(x, hx)
    finals = list(final) if isinstance(final, tuple) else [final]
    loss = (out * grad_out).sum() + sum(f.sum() for f in finals)
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, [x] + params)
    return [out.detach()] + [f.detach() for f in finals] + list(grads)


@pytest.mark.parametrize("hx_given", [False, True], ids=["hx=None", "hx"])
@pytest.mark.parametrize("name,sizes", _THREAD_SHAPES,
                         ids=[f"{n}-T{s[0]}-B{s[1]}-I{s[2]}-H{s[3]}-L{s[4]}"
                              for n, s in _THREAD_SHAPES])
def test_results_do_not_depend_on_the_thread_count(name, sizes, hx_given):
    steps, batch, input_size, hidden, layers = sizes
    module = getattr(rnnfast, name)(input_size, hidden, num_layers=layers)
    x = torch.randn(steps, batch, input_size)
    grad_out = torch.randn(steps, batch, hidden)
    hx = None
    if hx_given:
        h = torch.randn(layers, batch, hidden)
        hx = (h, torch.randn_like(h)) if name == "LSTM" else h
    threads_before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_forward_backward(module, x, hx, grad_out))
            with torch.no_grad():
                results[-1].append(module(x, hx)[0])
    finally:
        torch.set_num_threads(threads_before)
    for index, (one, two) in enumerate(zip(*results)):
        assert torch.equal(one, two), f"result {index} differs between 1 and 2 threads: " \
            f"{(one - two).abs().max().item()}"
