"""Dynamic shapes: one traced graph of an rnnfast model serves every batch size and sequence
length.

* torch.compile(dynamic=True), and the default dynamic mode with torch._dynamo.mark_dynamic,
  compile one forward graph (and, for a training step, one backward graph) for calls at three
  sequence lengths and three batch sizes, and give eager rnnfast's outputs and gradients;
* torch.export.export with torch.export.Dim for the batch and the time dimension, strict and
  non-strict, gives a program that runs at other sizes with eager's results (torch.nn's own
  layers export a dynamic batch only: their time loop specialises the length);
* a packed sequence under torch.compile (with graph breaks around the padding and packing, whose
  shapes are the lengths' values) gives eager's results, dropout between layers included, and
  compiles nothing new for other lengths and batch sizes.
"""
import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch.export import Dim
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfast

# (T, B) of the calls: three lengths and three batch sizes, each changed alone and together.
# None is 0 or 1, which TorchDynamo specialises by design (as it does for any model). The first
# call's T and B differ from each other and from every fixed size of the models (input 5,
# hidden 6, proj 3, layers x directions up to 4, a second layer's input 12): TorchDynamo gives
# equal sizes of a call one symbol, so a length equal to, say, h0.size(0) would be specialised
# by the check of h0's shape (torch.nn's layers alike).
SIZES = [(7, 9), (11, 9), (11, 5), (3, 13)]

# name -> (module class, constructor arguments, with initial states)
MODELS = {
    "lstm": (rnnfast.LSTM, dict(input_size=5, hidden_size=6), False),
    "lstm_2layer_bidir_h0": (rnnfast.LSTM, dict(input_size=5, hidden_size=6, num_layers=2,
                                                bidirectional=True), True),
    "lstm_2layer_bidir_batch_first": (rnnfast.LSTM,
                                      dict(input_size=5, hidden_size=6, num_layers=2,
                                           bidirectional=True, batch_first=True), False),
    "lstm_proj_batch_first_h0": (rnnfast.LSTM, dict(input_size=5, hidden_size=6, proj_size=3,
                                                    batch_first=True), True),
    "gru_2layer_batch_first_h0": (rnnfast.GRU, dict(input_size=5, hidden_size=6, num_layers=2,
                                                    batch_first=True), True),
    "gru_bidir": (rnnfast.GRU, dict(input_size=5, hidden_size=6, bidirectional=True), False),
    "rnn_tanh_h0": (rnnfast.RNN, dict(input_size=5, hidden_size=6), True),
    "rnn_relu_2layer_bidir_batch_first_h0": (rnnfast.RNN,
                                             dict(input_size=5, hidden_size=6, num_layers=2,
                                                  nonlinearity="relu", bidirectional=True,
                                                  batch_first=True), True),
}


class GraphCounter:
    """A torch.compile backend that runs AOTAutograd's graphs as they are (as "aot_eager"
    does) and counts the forward graphs (inference graphs included) and backward graphs it
    was given to compile."""

    def __init__(self):
        self.forward_graphs = 0
        self.backward_graphs = 0
        self.backend = aot_autograd(fw_compiler=self._forward, bw_compiler=self._backward)

    def _forward(self, graph_module, example_inputs):
        self.forward_graphs += 1
        return make_boxed_func(graph_module.forward)

    def _backward(self, graph_module, example_inputs):
        self.backward_graphs += 1
        return make_boxed_func(graph_module.forward)


# float32: the CPU engine chooses its paths by size for float32 only (a float64 trace never read
# a size there); float64: the ops' other instantiation.
DTYPES = [torch.float32, torch.float64]


def _build(name, dtype):
    cls, kwargs, with_h0 = MODELS[name]
    return cls(**kwargs).to(dtype), with_h0


def _inputs(model, with_h0, steps, batch):
    """input [T, B, I] or [B, T, I] and the initial states [L * D, B, P] (and c0 [L * D, B, H]
    for LSTM) or None, in the model's dtype, requiring grad."""
    dtype = model.weight_ih_l0.dtype
    shape = (batch, steps, model.input_size) if model.batch_first else \
        (steps, batch, model.input_size)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    if not with_h0:
        return x, None
    layers = model.num_layers * (2 if model.bidirectional else 1)
    state = model.proj_size or model.hidden_size
    h0 = torch.randn(layers, batch, state, dtype=dtype, requires_grad=True)
    if isinstance(model, rnnfast.LSTM):
        c0 = torch.randn(layers, batch, model.hidden_size, dtype=dtype, requires_grad=True)
        return x, (h0, c0)
    return x, h0


def _flat(hx):
    """The state tensors of hx (None, a tensor, or LSTM's pair) as a tuple."""
    if hx is None:
        return ()
    return tuple(hx) if isinstance(hx, tuple) else (hx,)


def _outputs(result):
    """(output, h_n[, c_n]) of a module's result."""
    output, state = result
    return (output, *_flat(state))


def _loss(outputs):
    # Weights the outputs differently so that no gradient is a plain sum.
    return sum((k + 1) * o.square().sum() for k, o in enumerate(outputs))


def _assert_matches_eager(run, model, x, hx):
    """run(x, hx)'s outputs and the gradients of its loss (input, states, every parameter)
    bit-identical to eager model(x, hx)'s."""
    leaves = [x, *_flat(hx), *model.parameters()]
    got = _outputs(run(x, hx))
    got_grads = torch.autograd.grad(_loss(got), leaves)
    want = _outputs(model(x, hx))
    want_grads = torch.autograd.grad(_loss(want), leaves)
    for a, b in zip(got + got_grads, want + want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_compile_dynamic_training_step_compiles_once(name, dtype):
    torch._dynamo.reset()
    model, with_h0 = _build(name, dtype)
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter.backend, dynamic=True, fullgraph=True)
    for steps, batch in SIZES:
        x, hx = _inputs(model, with_h0, steps, batch)
        _assert_matches_eager(compiled, model, x, hx)
    assert (counter.forward_graphs, counter.backward_graphs) == (1, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(MODELS))
def test_compile_dynamic_inference_compiles_once(name, dtype):
    torch._dynamo.reset()
    model, with_h0 = _build(name, dtype)
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter.backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for steps, batch in SIZES:
            x, hx = _inputs(model, with_h0, steps, batch)
            for a, b in zip(_outputs(compiled(x, hx)), _outputs(model(x, hx))):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (counter.forward_graphs, counter.backward_graphs) == (1, 0)


@pytest.mark.parametrize("name", ["lstm_2layer_bidir_h0", "gru_2layer_batch_first_h0"])
def test_compile_mark_dynamic_compiles_once(name):
    """The default mode (dynamic=None) with the batch and time dimensions marked dynamic."""
    torch._dynamo.reset()
    model, with_h0 = _build(name, torch.float32)
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter.backend, fullgraph=True)
    batch_dim, time_dim = (0, 1) if model.batch_first else (1, 0)
    for steps, batch in SIZES:
        x, hx = _inputs(model, with_h0, steps, batch)
        torch._dynamo.mark_dynamic(x, batch_dim)
        torch._dynamo.mark_dynamic(x, time_dim)
        for state in _flat(hx):
            torch._dynamo.mark_dynamic(state, 1)
        _assert_matches_eager(compiled, model, x, hx)
    assert (counter.forward_graphs, counter.backward_graphs) == (1, 1)


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN])
def test_compile_dynamic_tiniest_layers(cls):
    """Layers small enough for the CPU engine's register layer (at most 16 hidden units over the
    batch with AVX-512, 8 with AVX2; eager calls hand it a batch_first input as it is), float32: the compiled graph,
    which copies the input time-major for every size, gives eager's results."""
    torch._dynamo.reset()
    model = cls(3, 4, batch_first=True)
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter.backend, dynamic=True, fullgraph=True)
    parameters = list(model.parameters())
    for steps, batch in [(7, 2), (9, 2), (9, 3), (5, 4)]:
        x = torch.randn(batch, steps, 3, requires_grad=True)
        results = []
        for module in (compiled, model):
            outputs = _outputs(module(x))
            results.append(outputs + torch.autograd.grad(_loss(outputs), [x, *parameters]))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (counter.forward_graphs, counter.backward_graphs) == (1, 1)


@pytest.mark.parametrize("case", ["unbatched_lstm", "lstm_cell", "gru_cell"])
def test_compile_dynamic_unbatched_input_and_cells(case):
    """An unbatched input [T, I] (dynamic length) and the cells' input [B, I] (dynamic batch)."""
    torch._dynamo.reset()
    model = {"unbatched_lstm": rnnfast.LSTM(5, 6, num_layers=2),
             "lstm_cell": rnnfast.LSTMCell(5, 6), "gru_cell": rnnfast.GRUCell(5, 6)}[case]
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter.backend, dynamic=True, fullgraph=True)
    parameters = list(model.parameters())
    for steps, batch in SIZES:
        x = torch.randn((steps if case == "unbatched_lstm" else batch, 5), requires_grad=True)
        results = []
        for module in (compiled, model):
            result = module(x)
            outputs = _outputs(result) if case == "unbatched_lstm" else _flat(result)
            results.append(outputs + torch.autograd.grad(_loss(outputs), [x, *parameters]))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (counter.forward_graphs, counter.backward_graphs) == (1, 1)


def _dynamic_shapes(model, with_h0):
    """export's dynamic_shapes for (input, hx): the batch and time dimensions of the input, the
    batch dimension of the states."""
    batch, steps = Dim("batch"), Dim("time")
    x_dims = {0: batch, 1: steps} if model.batch_first else {0: steps, 1: batch}
    if not with_h0:
        return {"input": x_dims, "hx": None}
    state_dims = {1: batch}
    hx_dims = (state_dims, state_dims) if isinstance(model, rnnfast.LSTM) else state_dims
    return {"input": x_dims, "hx": hx_dims}


@pytest.mark.parametrize("strict", [False, True], ids=["non_strict", "strict"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_dynamic_batch_and_time(name, strict):
    model, with_h0 = _build(name, torch.float32)
    x, hx = _inputs(model, with_h0, 5, 3)
    program = torch.export.export(model, (x, hx), dynamic_shapes=_dynamic_shapes(model, with_h0),
                                  strict=strict)
    exported = program.module()
    for steps, batch in SIZES:
        x, hx = _inputs(model, with_h0, steps, batch)
        _assert_matches_eager(exported, model, x, hx)


def _packed(x, lengths):
    """x [T, B, I] packed with lengths [B] in no particular order."""
    return pack_padded_sequence(x, lengths, enforce_sorted=False)


def _random_lengths(steps, batch):
    lengths = torch.randint(1, steps + 1, (batch,))
    lengths[torch.randint(batch, ())] = steps  # the padded length is T
    return lengths


@pytest.mark.parametrize("cls", [rnnfast.LSTM, rnnfast.GRU, rnnfast.RNN])
def test_compile_dynamic_packed_sequence(cls):
    """Graph breaks around the padding and the packing (torch.nn's layers run outside the graph
    altogether); the first call compiles its pieces, later sizes compile nothing new."""
    torch._dynamo.reset()
    model = cls(5, 6, num_layers=2, bidirectional=True)
    counter = GraphCounter()
    compiled = torch.compile(model, backend=counter.backend, dynamic=True)
    parameters = list(model.parameters())
    graphs_after_first_call = None
    for steps, batch in SIZES:
        x = torch.randn(steps, batch, 5, requires_grad=True)
        lengths = _random_lengths(steps, batch)
        results = []
        for module in (compiled, model):
            output, state = module(_packed(x, lengths))
            outputs = (output.data, *_flat(state))
            # The graph retained: an eager backward that releases it writes the gate gradients
            # over a packed sequence's workspace and sums the weight gradients over its packed
            # rows, in another order than the compiled graph's backward (the same values to
            # rounding; tests/test_ops.py compares the two).
            results.append(outputs + torch.autograd.grad(_loss(outputs), [x, *parameters],
                                                         retain_graph=True))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        if graphs_after_first_call is None:
            graphs_after_first_call = (counter.forward_graphs, counter.backward_graphs)
    assert graphs_after_first_call[0] > 0
    assert (counter.forward_graphs, counter.backward_graphs) == graphs_after_first_call


def test_compile_packed_sequence_with_dropout_draws_as_eager():
    """Dropout between layers of a packed sequence is drawn on its packed data, outside the
    graph: a seeded compiled call gives the seeded eager call's outputs and gradients."""
    torch._dynamo.reset()
    model = rnnfast.GRU(5, 6, num_layers=3, dropout=0.5).train()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    parameters = list(model.parameters())
    for steps, batch in SIZES[:2]:
        x = torch.randn(steps, batch, 5)
        lengths = _random_lengths(steps, batch)
        results = []
        for module in (compiled, model):
            torch.manual_seed(steps)
            output, h_n = module(_packed(x, lengths))
            results.append((output.data, h_n) +
                           # (retained: see test_compile_dynamic_packed_sequence)
                           torch.autograd.grad(_loss((output.data, h_n)), parameters,
                                               retain_graph=True))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
