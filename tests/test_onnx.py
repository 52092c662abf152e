"""torch.onnx.export of models with rnnfast's layers and cells, with both exporters of torch:
the default one (torch.export based; called without a `dynamo` argument, as users call it) and
the TorchScript one (dynamo=False). Each model is exported as it is, run in onnxruntime and
compared with rnnfast's own outputs; its graph must hold the operators the same model with
torch.nn's layers exports to (ONNX's LSTM and GRU; RNN with dynamo=False, where the default
exporter writes torch.nn's Elman layers as plain operators) and nothing of rnnfast's op.
onnx and onnxruntime are test dependencies (requirements.txt, setup.py's `test` extra)."""
import copy
import warnings

import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfast

EXPORTERS = [pytest.param({}, id="default"), pytest.param({"dynamo": False}, id="torchscript")]


def _flatten(outputs):
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in _flatten(item)]


def _export(model, args, path, exporter, **options):
    """torch.onnx.export(model, args, path) with the exporter's arguments; returns the loaded
    ONNX model. The exporters' warnings (the TorchScript one's deprecation, shape inference)
    say nothing of the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), **exporter, **options)
    return onnx.load(str(path))


def _op_types(onnx_model):
    return sorted(node.op_type for node in onnx_model.graph.node)


def _run_onnxruntime(path, inputs):
    """The exported model's outputs from onnxruntime, for `inputs` (tensors in the order of the
    model's graph inputs)."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [graph_input.name for graph_input in session.get_inputs()]
    assert len(names) == len(inputs), f"graph inputs {names} for {len(inputs)} tensors"
    return [torch.from_numpy(array) for array in
            session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})]


def _check_export(model, args, tmp_path, exporter, expected_op=None):
    """Exports `model` (with rnnfast's modules) and the same model with torch.nn's, checks the
    graph has torch.nn's operators (and `expected_op`), none of rnnfast's, and that onnxruntime
    gives rnnfast's outputs. Returns the graph's operator types."""
    model = model.eval()
    reference = rnnfast.convert(copy.deepcopy(model), to="torch")
    exported = _export(model, args, tmp_path / "rnnfast.onnx", exporter)
    torch_nn_exported = _export(reference, args, tmp_path / "torch_nn.onnx", exporter)
    op_types = _op_types(exported)
    assert op_types == _op_types(torch_nn_exported)
    if expected_op is not None:
        assert expected_op in op_types
    assert all(node.domain in ("", "ai.onnx") for node in exported.graph.node), op_types
    with torch.no_grad():
        expected = _flatten(model(*args))
    actual = _run_onnxruntime(tmp_path / "rnnfast.onnx", _flatten(args))
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want)
    return op_types


class Tagger(nn.Module):
    """A user's model: a recurrent layer between an embedding and a linear head."""

    def __init__(self, recurrent, vocabulary=20, classes=5):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, recurrent.input_size)
        self.recurrent = recurrent
        directions = 2 if recurrent.bidirectional else 1
        self.head = nn.Linear(directions * recurrent.hidden_size, classes)

    def forward(self, tokens):
        output, _ = self.recurrent(self.embedding(tokens))
        return self.head(output).log_softmax(-1)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", ["LSTM", "GRU"])
def test_user_model_exports_as_with_torch_nn(exporter, name, tmp_path):
    recurrent = getattr(rnnfast, name)(6, 8, num_layers=2, bidirectional=True, batch_first=True)
    tokens = torch.randint(0, 20, (3, 7))
    _check_export(Tagger(recurrent), (tokens,), tmp_path, exporter, expected_op=name)


# (class, constructor arguments, input shape, with initial states)
LAYERS = [
    pytest.param("LSTM", {"num_layers": 2, "bidirectional": True}, (5, 2, 4), True,
                 id="lstm-2layers-bidirectional-h0"),
    pytest.param("LSTM", {"bias": False, "batch_first": True}, (2, 5, 4), True,
                 id="lstm-nobias-batch_first-h0"),
    pytest.param("LSTM", {}, (5, 4), True, id="lstm-unbatched-h0"),
    pytest.param("GRU", {"num_layers": 2, "batch_first": True}, (2, 5, 4), False,
                 id="gru-2layers-batch_first"),
    pytest.param("GRU", {"bidirectional": True, "bias": False}, (5, 2, 4), True,
                 id="gru-bidirectional-nobias-h0"),
    pytest.param("RNN", {"num_layers": 2, "bidirectional": True}, (3, 2, 4), True,
                 id="rnn-tanh-2layers-bidirectional-h0"),
    pytest.param("RNN", {"nonlinearity": "relu", "batch_first": True}, (2, 5, 4), False,
                 id="rnn-relu-batch_first"),
]


def _initial_states(layer, input):
    batch_shape = (input.size(0 if layer.batch_first else 1),) if input.dim() == 3 else ()
    shape = (layer.num_layers * (2 if layer.bidirectional else 1), *batch_shape,
             layer.hidden_size)
    if isinstance(layer, rnnfast.LSTM):
        return (torch.randn(shape), torch.randn(shape))
    return torch.randn(shape)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name, arguments, shape, with_states", LAYERS)
def test_layer_exports_as_with_torch_nn(exporter, name, arguments, shape, with_states,
                                        tmp_path):
    layer = getattr(rnnfast, name)(4, 6, **arguments)
    input = torch.randn(shape)
    args = (input, _initial_states(layer, input)) if with_states else (input,)
    op_types = _check_export(layer, args, tmp_path, exporter)
    # The default exporter writes torch.nn's Elman layers as plain operators.
    if name != "RNN" or exporter.get("dynamo") is False:
        assert name in op_types


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dynamic_sizes_run_at_other_sizes(exporter, tmp_path):
    """A model exported with a dynamic batch axis (and time axis, with dynamo=False) gives
    rnnfast's outputs at other sizes. The default exporter's torch.export specializes the time
    axis of torch.nn's LSTM (and so of rnnfast's, which it exports as torch.nn's) to the
    example's length."""
    layer = rnnfast.LSTM(4, 6, num_layers=2, batch_first=True).eval()
    if exporter.get("dynamo") is False:
        options = {"input_names": ["input"], "dynamic_axes": {"input": {0: "batch", 1: "time"}}}
        other = torch.randn(5, 11, 4)
    else:
        options = {"dynamic_shapes": ({0: torch.export.Dim("batch")},)}
        other = torch.randn(5, 7, 4)
    _export(layer, (torch.randn(3, 7, 4),), tmp_path / "dynamic.onnx", exporter, **options)
    with torch.no_grad():
        expected = _flatten(layer(other))
    for got, want in zip(_run_onnxruntime(tmp_path / "dynamic.onnx", [other]), expected):
        torch.testing.assert_close(got, want)


class PackedEncoder(nn.Module):
    """Padded sequences of several lengths through an LSTM as a packed sequence."""

    def __init__(self, layer_class):
        super().__init__()
        self.recurrent = layer_class(4, 6, bidirectional=True)

    def forward(self, padded, lengths):
        packed = pack_padded_sequence(padded, lengths, enforce_sorted=False)
        output, (h_n, _) = self.recurrent(packed)
        return pad_packed_sequence(output)[0], h_n


def test_packed_sequence_exports_with_torchscript_exporter(tmp_path):
    """The TorchScript exporter writes a packed sequence as the LSTM operator's sequence
    lengths, for rnnfast's LSTM as for torch.nn's (the default exporter exports neither)."""
    padded, lengths = torch.randn(5, 3, 4), torch.tensor([5, 2, 3])
    op_types = _check_export(PackedEncoder(rnnfast.LSTM), (padded, lengths), tmp_path,
                             {"dynamo": False}, expected_op="LSTM")
    assert op_types.count("LSTM") == 1


# Cells: torch.nn's export as plain operators; rnnfast's activations beyond torch.nn's too.
CELLS = [
    pytest.param("LSTMCell", {}, True, id="lstm"),
    pytest.param("GRUCell", {"bias": False}, True, id="gru-nobias"),
    pytest.param("RNNCell", {"nonlinearity": "relu"}, False, id="rnn-relu"),
]
# (class, constructor arguments, batched input, with a state)
EXTRA_CELLS = [
    pytest.param("LSTMCell", {"activation": "relu"}, True, True, id="lstm-relu"),
    pytest.param("LSTMCell", {"activation": "sigmoid"}, False, False,
                 id="lstm-sigmoid-unbatched-nostate"),
    pytest.param("RNNCell", {"nonlinearity": "sigmoid"}, True, False, id="rnn-sigmoid-nostate"),
    pytest.param("RNNCell", {"nonlinearity": "sigmoid"}, False, True,
                 id="rnn-sigmoid-unbatched"),
]


def _cell_args(cell, batched, with_state):
    batch = (3,) if batched else ()
    input = torch.randn(*batch, cell.input_size)
    if not with_state:
        return (input,)
    state = torch.randn(*batch, cell.hidden_size)
    return (input, (state, torch.randn_like(state)) if isinstance(cell, nn.LSTMCell) else state)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name, arguments, with_state", CELLS)
def test_cell_exports_as_with_torch_nn(exporter, name, arguments, with_state, tmp_path):
    cell = getattr(rnnfast, name)(4, 6, **arguments)
    _check_export(cell, _cell_args(cell, True, with_state), tmp_path, exporter)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name, arguments, batched, with_state", EXTRA_CELLS)
def test_cell_with_rnnfast_activation_exports_as_plain_operators(exporter, name, arguments,
                                                                 batched, with_state, tmp_path):
    """torch.nn has no such cell to compare the graph with: its outputs from onnxruntime are
    rnnfast's, from standard operators."""
    cell = getattr(rnnfast, name)(4, 6, **arguments).eval()
    args = _cell_args(cell, batched, with_state)
    exported = _export(cell, args, tmp_path / "cell.onnx", exporter)
    activation = arguments.get("activation", arguments.get("nonlinearity")).capitalize()
    assert activation in _op_types(exported)
    assert all(node.domain in ("", "ai.onnx") for node in exported.graph.node)
    with torch.no_grad():
        expected = _flatten(cell(*args))
    for got, want in zip(_run_onnxruntime(tmp_path / "cell.onnx", _flatten(args)), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("make_layer, option", [
    (lambda: rnnfast.LSTM(4, 6, activation="relu"), "activation='relu'"),
    (lambda: rnnfast.RNN(4, 6, nonlinearity="sigmoid"), "nonlinearity='sigmoid'"),
    (lambda: rnnfast.LSTM(4, 6, proj_size=3), "proj_size=3"),
], ids=["lstm-activation", "rnn-sigmoid", "lstm-proj_size"])
def test_layer_option_without_onnx_form_is_refused_by_name(exporter, make_layer, option,
                                                           tmp_path):
    with pytest.raises(torch.onnx.OnnxExporterError, match=f"rnnfast.* with {option}"):
        _export(make_layer().eval(), (torch.randn(5, 2, 4),), tmp_path / "refused.onnx",
                exporter)


def test_other_traces_keep_rnnfast_op():
    """Only ONNX export switches to torch.nn's computation: torch.export and torch.jit.trace
    keep rnnfast's op (and a compiled layer still gives rnnfast's results)."""
    layer = rnnfast.GRU(4, 6, num_layers=2)
    input = torch.randn(5, 2, 4)
    program = torch.export.export(layer, (input,))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert torch.ops.rnnfast.forward.default in targets
    traced = torch.jit.trace(layer, (input,))
    assert "rnnfast::forward" in str(traced.graph)
    torch.testing.assert_close(program.module()(input), layer(input))
