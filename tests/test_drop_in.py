"""rnnfast as a drop-in for torch.nn in code written for torch.nn: the same exceptions for bad
arguments and odd input, the same repr and torch.nn.RNNBase surface, isinstance of torch.nn's
classes, torch.load of a saved whole model, the same random stream with dropout, and
rnnfast.convert of an existing model. Each check runs the same thing through torch.nn."""
import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfast
from test_clients import RNNModel

NAMES = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]


def _outcome(case, namespace):
    """(exception or None, result) of case(namespace)."""
    try:
        return None, case(namespace)
    except Exception as error:  # noqa: BLE001  (the exception is what is compared)
        return error, None


def _shapes(result):
    if isinstance(result, torch.Tensor):
        return tuple(result.shape)
    if isinstance(result, nn.Module):
        return [tuple(p.shape) for p in result.parameters()]
    return [_shapes(r) for r in result]


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# Each case builds a module from the namespace given (torch.nn or rnnfast) and, for forward
# cases, calls it on fresh random input.
CASES = {
    # Constructors.
    "bias=0": lambda n: n.LSTM(3, 4, bias=0),
    "batch_first='False'": lambda n: n.GRU(3, 4, batch_first="False"),
    "input_size=3.0": lambda n: n.RNN(3.0, 4),
    "hidden_size=0": lambda n: n.LSTM(3, 0),
    "hidden_size=4.0": lambda n: n.GRU(3, 4.0),
    "num_layers=0": lambda n: n.RNN(3, 4, num_layers=0),
    "num_layers=2.0": lambda n: n.LSTM(3, 4, num_layers=2.0),
    "dropout=2": lambda n: n.LSTM(3, 4, 2, dropout=2),
    "dropout=True": lambda n: n.GRU(3, 4, 2, dropout=True),
    "proj_size=hidden_size": lambda n: n.LSTM(3, 4, proj_size=4),
    "proj_size=-1": lambda n: n.LSTM(3, 4, proj_size=-1),
    "RNN proj_size": lambda n: n.RNN(3, 4, proj_size=10),
    "GRU proj_size": lambda n: n.GRU(3, 4, proj_size=2),
    "RNN nonlinearity": lambda n: n.RNN(3, 4, nonlinearity="foo"),
    "RNN nonlinearity positional": lambda n: n.RNN(3, 4, 1, "gelu"),
    "RNNCell nonlinearity accepted": lambda n: n.RNNCell(3, 4, nonlinearity="foo"),
    "RNNCell(10, 0)": lambda n: n.RNNCell(10, 0),
    "GRUCell(0, 4)": lambda n: n.GRUCell(0, 4),
    "LSTMCell(-1, 4)": lambda n: n.LSTMCell(-1, 4),
    "LSTMCell(3.0, 4)": lambda n: n.LSTMCell(3.0, 4),
    "RNNCell bias=0": lambda n: n.RNNCell(3, 4, bias=0),
    # Layers' forward.
    "LSTM input_size": lambda n: n.LSTM(10, 4)(randn(5, 2, 11)),
    "GRU input_size unbatched": lambda n: n.GRU(10, 4)(randn(5, 11)),
    "RNN input_size packed": lambda n: n.RNN(10, 4)(
        pack_padded_sequence(randn(5, 2, 11), [5, 3])),
    "LSTM hidden[0] size": lambda n: n.LSTM(3, 4)(randn(5, 2, 3), (randn(1, 3, 4), randn(1, 2, 4))),
    "LSTM hidden[1] size": lambda n: n.LSTM(3, 4, 2)(randn(5, 2, 3),
                                                     (randn(2, 2, 4), randn(2, 2, 5))),
    "LSTM projected hidden[0] size": lambda n: n.LSTM(3, 4, proj_size=2)(
        randn(5, 2, 3), (randn(1, 2, 4), randn(1, 2, 4))),
    "GRU hidden size": lambda n: n.GRU(3, 4)(randn(5, 2, 3), randn(2, 2, 4)),
    "RNN hidden size unbatched": lambda n: n.RNN(3, 4, bidirectional=True)(randn(5, 3),
                                                                           randn(1, 4)),
    "GRU hidden size packed": lambda n: n.GRU(3, 4)(
        pack_padded_sequence(randn(5, 2, 3), [5, 3]), randn(1, 3, 4)),
    "LSTM length 0": lambda n: n.LSTM(3, 4)(randn(0, 2, 3)),
    "GRU length 0 batch_first": lambda n: n.GRU(3, 4, batch_first=True)(randn(2, 0, 3)),
    "RNN length 0 unbatched": lambda n: n.RNN(3, 4)(randn(0, 3)),
    "LSTM batch 0": lambda n: n.LSTM(3, 4)(randn(5, 0, 3)),
    "LSTM float64 input": lambda n: n.LSTM(3, 4)(randn(5, 2, 3, dtype=torch.float64)),
    "GRU float32 input, float64 module": lambda n: n.GRU(3, 4, dtype=torch.float64)(
        randn(5, 2, 3)),
    "RNN float64 packed input": lambda n: n.RNN(3, 4)(
        pack_padded_sequence(randn(5, 2, 3, dtype=torch.float64), [5, 3])),
    "LSTM 4-D input": lambda n: n.LSTM(3, 4)(randn(5, 2, 1, 3)),
    "GRU 1-D input": lambda n: n.GRU(3, 4)(randn(3)),
    "RNN 4-D input": lambda n: n.RNN(3, 4)(randn(5, 2, 1, 3)),
    "LSTM 2-D hx, batched input": lambda n: n.LSTM(3, 4)(randn(5, 2, 3),
                                                         (randn(1, 4), randn(1, 4))),
    "LSTM 3-D hx, unbatched input": lambda n: n.LSTM(3, 4)(randn(5, 3),
                                                           (randn(1, 4), randn(1, 1, 4))),
    "GRU 2-D hx, batched input": lambda n: n.GRU(3, 4)(randn(5, 2, 3), randn(1, 4)),
    "RNN 3-D hx, unbatched input": lambda n: n.RNN(3, 4)(randn(5, 3), randn(1, 1, 4)),
    # Cells' forward.
    "LSTMCell input_size": lambda n: n.LSTMCell(10, 4)(randn(2, 11)),
    "GRUCell input_size": lambda n: n.GRUCell(10, 4)(randn(2, 11)),
    "RNNCell input_size unbatched": lambda n: n.RNNCell(10, 4)(randn(11)),
    "GRUCell 3-D input": lambda n: n.GRUCell(3, 4)(randn(1, 2, 3)),
    "LSTMCell 0-D input": lambda n: n.LSTMCell(3, 4)(randn()),
    "RNNCell 4-D hx": lambda n: n.RNNCell(3, 4)(randn(2, 3), randn(1, 1, 2, 4)),
    "GRUCell 4-D hx": lambda n: n.GRUCell(3, 4)(randn(2, 3), randn(1, 1, 2, 4)),
    "LSTMCell 4-D hx[0]": lambda n: n.LSTMCell(3, 4)(randn(2, 3),
                                                     (randn(1, 1, 2, 4), randn(2, 4))),
    "LSTMCell 3-D hx[1]": lambda n: n.LSTMCell(3, 4)(randn(2, 3), (randn(2, 4), randn(1, 2, 4))),
    "GRUCell hidden batch": lambda n: n.GRUCell(3, 4)(randn(2, 3), randn(3, 4)),
    "GRUCell hidden size": lambda n: n.GRUCell(3, 4)(randn(2, 3), randn(2, 5)),
    "LSTMCell hidden0 batch": lambda n: n.LSTMCell(3, 4)(randn(2, 3), (randn(3, 4), randn(2, 4))),
    "LSTMCell hidden1 size": lambda n: n.LSTMCell(3, 4)(randn(2, 3), (randn(2, 4), randn(2, 5))),
    "RNNCell 2-D hx, unbatched input": lambda n: n.RNNCell(3, 4)(randn(3), randn(1, 4)),
    "RNNCell unknown nonlinearity": lambda n: n.RNNCell(3, 4, nonlinearity="foo")(randn(2, 3)),
    "RNNCell nonlinearity changed": lambda n: _set(n.RNNCell(3, 4), nonlinearity="gelu")(
        randn(2, 3)),
    "RNNCell(10, 0) forward": lambda n: n.RNNCell(10, 0)(randn(2, 10), randn(2, 0)),
    "LSTMCell(10, 0) forward": lambda n: n.LSTMCell(10, 0)(randn(2, 10)),
    "GRUCell(0, 4) forward": lambda n: n.GRUCell(0, 4)(randn(2, 0), randn(2, 4)),
    "LSTMCell batch 0": lambda n: n.LSTMCell(3, 4)(randn(0, 3)),
}

# A state or input of another dtype than the weights: torch.nn's GRU and RNN layers and its cells
# multiply it by a weight, and raise that product's error.
CASES.update({
    "GRU hx float64": lambda n: n.GRU(3, 4)(randn(5, 2, 3), randn(1, 2, 4, dtype=torch.float64)),
    "RNN hx float16 unbatched": lambda n: n.RNN(3, 4)(randn(5, 3), randn(1, 4).half()),
    "GRUCell float64 input": lambda n: n.GRUCell(3, 4)(randn(2, 3, dtype=torch.float64)),
    "RNNCell hx int64": lambda n: n.RNNCell(3, 4)(randn(2, 3), torch.zeros(2, 4).long()),
    "LSTMCell hx float64": lambda n: n.LSTMCell(3, 4)(
        randn(2, 3), (randn(2, 4, dtype=torch.float64), randn(2, 4))),
    "GRUCell float32 input, float64 module": lambda n: n.GRUCell(3, 4, dtype=torch.float64)(
        randn(2, 3)),
})

# torch.nn's words for these come from the kernel it happens to run (oneDNN's LSTM): the
# exception type is the same, rnnfast names the argument and both dtypes. (torch.nn.LSTMCell
# promotes a float64 cx to a float64 c'; rnnfast refuses it like the other mismatches.)
SAME_TYPE_ONLY = {
    "LSTM hx float64": lambda n: n.LSTM(3, 4)(
        randn(5, 2, 3), (randn(1, 2, 4, dtype=torch.float64), randn(1, 2, 4))),
    "LSTM cx float64": lambda n: n.LSTM(3, 4)(
        randn(5, 2, 3), (randn(1, 2, 4), randn(1, 2, 4, dtype=torch.float64))),
}

# Where torch.nn's error depends on what its code happens to do with a value of the wrong kind
# (AttributeError from .dim(), IndexError from hx[1], RuntimeError or TypeError from the cell's
# op), rnnfast raises one exception class that is all of those types (NotATensorError,
# HiddenStatePairError): it is an instance of torch.nn's type, with torch.nn's message in its own.
SUBCLASS_OF_TORCH_TYPE = {
    "GRU list input": lambda n: n.GRU(3, 4)([1, 2]),
    "RNN None input": lambda n: n.RNN(3, 4)(None),
    "LSTMCell list input": lambda n: n.LSTMCell(3, 4)([1.0, 2.0, 3.0]),
    "GRU list hx": lambda n: n.GRU(3, 4)(randn(5, 2, 3), [1, 2]),
    "LSTM list c_0": lambda n: n.LSTM(3, 4)(randn(5, 2, 3), (randn(1, 2, 4), [1])),
    "GRUCell int hx": lambda n: n.GRUCell(3, 4)(randn(2, 3), 3),
    "LSTM hx of 3": lambda n: n.LSTM(3, 4)(randn(5, 2, 3), (randn(1, 2, 4),) * 3),
    "LSTM hx of 1": lambda n: n.LSTM(3, 4)(randn(5, 2, 3), (randn(1, 2, 4),)),
    "LSTM hx list of 0": lambda n: n.LSTM(3, 4)(randn(5, 2, 3), []),
    "LSTMCell hx of 1": lambda n: n.LSTMCell(3, 4)(randn(2, 3), (randn(2, 4),)),
    "LSTMCell hx list of 3": lambda n: n.LSTMCell(3, 4)(randn(2, 3), [randn(2, 4)] * 3),
    "LSTMCell hx tensor": lambda n: n.LSTMCell(3, 4)(randn(2, 3), randn(2, 4)),
    "LSTMCell hx int": lambda n: n.LSTMCell(3, 4)(randn(2, 3), 5),
}


def _set(module, **attributes):
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


@pytest.mark.filterwarnings("ignore:dropout option adds dropout")
@pytest.mark.parametrize("name", list(CASES))
def test_odd_arguments_and_input_as_torch_nn(name):
    """torch.nn raises: rnnfast raises the same type, its message containing torch.nn's;
    torch.nn accepts: rnnfast accepts, with results of the same shapes."""
    case = CASES[name]
    expected_error, expected = _outcome(case, nn)
    error, result = _outcome(case, rnnfast)
    if expected_error is None:
        assert error is None, f"torch.nn accepts {name}; rnnfast raises {error!r}"
        assert _shapes(result) == _shapes(expected)
        return
    assert type(error) is type(expected_error), (
        f"{name}: torch.nn raises {expected_error!r}, rnnfast {error!r}")
    assert str(expected_error) in str(error)


@pytest.mark.parametrize("name", list(SAME_TYPE_ONLY))
def test_mismatched_state_dtypes_raise_torch_nn_type(name):
    expected_error, _ = _outcome(SAME_TYPE_ONLY[name], nn)
    error, _ = _outcome(SAME_TYPE_ONLY[name], rnnfast)
    assert expected_error is not None
    assert type(error) is type(expected_error)
    assert "float64" in str(error) and "float32" in str(error)


@pytest.mark.parametrize("name", list(SUBCLASS_OF_TORCH_TYPE))
def test_values_of_the_wrong_kind_raise_torch_nn_type_and_words(name):
    expected_error, _ = _outcome(SUBCLASS_OF_TORCH_TYPE[name], nn)
    error, _ = _outcome(SUBCLASS_OF_TORCH_TYPE[name], rnnfast)
    assert expected_error is not None
    assert isinstance(error, type(expected_error)), (
        f"{name}: torch.nn raises {expected_error!r}, rnnfast {error!r}")
    assert str(expected_error) in str(error)


REPR_ARGUMENTS = {
    "LSTM": [(3, 4), (3, 4, 2), dict(input_size=3, hidden_size=4, num_layers=2, bias=False,
                                     batch_first=True, dropout=0.5, bidirectional=True,
                                     proj_size=2)],
    "GRU": [(3, 4), dict(input_size=3, hidden_size=4, num_layers=3, dropout=0.25,
                         bidirectional=True)],
    "RNN": [(3, 4), (3, 4, 2, "relu"), dict(input_size=3, hidden_size=4, nonlinearity="relu",
                                            bias=False, batch_first=True)],
    "LSTMCell": [(3, 4), (3, 4, False)],
    "GRUCell": [(3, 4), dict(input_size=3, hidden_size=4, bias=False)],
    "RNNCell": [(3, 4), (3, 4, True, "relu"), dict(input_size=3, hidden_size=4, bias=False,
                                                   nonlinearity="relu")],
}


@pytest.mark.parametrize("name,arguments",
                         [(n, a) for n, cases in REPR_ARGUMENTS.items() for a in cases])
def test_repr_as_torch_nn(name, arguments):
    def build(namespace):
        cls = getattr(namespace, name)
        return cls(**arguments) if isinstance(arguments, dict) else cls(*arguments)
    assert repr(build(rnnfast)) == repr(build(nn))


def test_repr_names_the_extras():
    assert repr(rnnfast.RNN(3, 4, nonlinearity="sigmoid")) == "RNN(3, 4, nonlinearity='sigmoid')"
    assert repr(rnnfast.LSTM(3, 4, activation="relu")) == "LSTM(3, 4, activation='relu')"
    assert repr(rnnfast.RNNCell(3, 4, nonlinearity="sigmoid")) == \
        "RNNCell(3, 4, nonlinearity=sigmoid)"


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_are_instances_of_torch_nn_cells(name):
    module = getattr(rnnfast, name)(3, 4)
    assert isinstance(module, getattr(nn, name)) and isinstance(module, nn.RNNCellBase)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    x = torch.randn(2, 3)
    got, want = compiled(x), module(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_layers_are_instances_of_rnnbase(name):
    """Instances of torch.nn.RNNBase, not of nn.LSTM / GRU / RNN themselves: TorchDynamo
    refuses to trace any instance of those (torch._dynamo.config.allow_rnn), which would take
    torch.compile from rnnfast's layers."""
    module = getattr(rnnfast, name)(3, 4)
    assert isinstance(module, nn.RNNBase)
    assert not isinstance(module, (nn.LSTM, nn.GRU, nn.RNN))
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(compiled(x)[0], module(x)[0], rtol=0, atol=0)


LAYER_CONFIGS = [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("LSTM", dict(num_layers=1, bias=False)),
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("RNN", dict(num_layers=3, bias=False, nonlinearity="relu")),
]


def _pair(name, config, dtype=torch.float64):
    expected = getattr(nn, name)(3, 5, dtype=dtype, **config)
    actual = getattr(rnnfast, name)(3, 5, dtype=dtype, **config)
    actual.load_state_dict(expected.state_dict(), strict=True)
    return expected, actual


@pytest.mark.parametrize("name,config", LAYER_CONFIGS)
def test_rnnbase_surface_as_torch_nn(name, config):
    """_flat_weights_names, _flat_weights, all_weights, _all_weights, proj_size and
    flatten_parameters() as torch.nn's, also after a parameter is replaced."""
    expected, actual = _pair(name, config)
    for module in (expected, actual):
        assert module.flatten_parameters() is None
    assert actual._flat_weights_names == expected._flat_weights_names
    assert actual._all_weights == expected._all_weights
    assert actual.proj_size == expected.proj_size
    assert actual.mode == expected.mode
    for got, want in zip(actual._flat_weights, expected._flat_weights, strict=True):
        assert torch.equal(got, want)
    for got_layer, want_layer in zip(actual.all_weights, expected.all_weights, strict=True):
        assert [tuple(w.shape) for w in got_layer] == [tuple(w.shape) for w in want_layer]
        assert all(torch.equal(g, w) for g, w in zip(got_layer, want_layer, strict=True))
    replacement = torch.randn_like(expected.weight_hh_l0)
    for module in (expected, actual):
        module.weight_hh_l0 = nn.Parameter(replacement.clone())
        index = module._flat_weights_names.index("weight_hh_l0")
        assert module._flat_weights[index] is module.weight_hh_l0
        assert module.all_weights[0][1] is module.weight_hh_l0


@pytest.mark.parametrize("name,config", LAYER_CONFIGS)
def test_flat_weights_follow_a_parametrization_as_torch_nn(name, config):
    """After weight_norm and a forward, _flat_weights holds the computed weight, as
    torch.nn's forward leaves it; the outputs agree."""
    expected, actual = _pair(name, config)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    outputs = []
    for module in (expected, actual):
        nn.utils.parametrizations.weight_norm(module, "weight_ih_l0")
        outputs.append(module(x)[0])
        index = module._flat_weights_names.index("weight_ih_l0")
        assert torch.equal(module._flat_weights[index], module.weight_ih_l0)
    torch.testing.assert_close(outputs[1], outputs[0])


@pytest.mark.parametrize("name,config", LAYER_CONFIGS)
def test_functional_call_as_torch_nn(name, config):
    """torch.func.functional_call swaps in other weights for one call (torch.nn re-reads
    _flat_weights when they changed): the same outputs, and the module's own weights after."""
    expected, actual = _pair(name, config)
    weights = {key: torch.randn_like(value) for key, value in expected.named_parameters()}
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.func.functional_call(actual, weights, (x,))[0],
                               torch.func.functional_call(expected, weights, (x,))[0])
    torch.testing.assert_close(actual(x)[0], expected(x)[0])


class _Tagger(nn.Module):
    """A user's model class around rnnfast layers, for the checkpoint test."""

    def __init__(self):
        super().__init__()
        self.rnn = rnnfast.LSTM(3, 5, num_layers=2, batch_first=True)
        self.cell = rnnfast.GRUCell(5, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.out(self.cell(output[:, -1]))


def test_torch_load_of_a_whole_model():
    """torch.save(model) then torch.load (weights_only, the default) after import rnnfast: only
    the user's own classes need allowing, as with any model."""
    model = _Tagger().double()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals([_Tagger, nn.Linear]):
        loaded = torch.load(buffer)
    assert type(loaded.rnn) is rnnfast.LSTM and type(loaded.cell) is rnnfast.GRUCell
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    layer = rnnfast.RNN(3, 4, nonlinearity="sigmoid")
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(loaded(x)[0], layer(x)[0], rtol=0, atol=0)


def _seeded_train_step(module, x, lengths, packed, hx):
    """Forward and backward in train mode from seed 1: output and every gradient."""
    module.train()
    x = x.detach().requires_grad_()
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
    torch.manual_seed(1)
    output, state = module(inp, hx)
    output = output.data if packed else output
    states = state if isinstance(state, tuple) else (state,)
    loss = (output * torch.linspace(-1, 1, output.numel(), dtype=output.dtype)
            .view_as(output)).sum() + sum((s ** 2).sum() for s in states)
    loss.backward()
    return [output, *states, x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", ["GRU", "LSTM"])
def test_dropout_draws_torch_nn_random_stream(name, packed):
    """A seeded forward and backward with dropout 0.3 between the layers of a 2-layer
    bidirectional layer gives torch.nn's outputs and gradients: the masks are drawn from
    torch's generator as torch.nn draws them (on the packed data for packed input)."""
    expected, actual = _pair(name, dict(num_layers=2, bidirectional=True, dropout=0.3))
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 5, 2])
    results = [_seeded_train_step(m, x, lengths, packed, None) for m in (expected, actual)]
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)
    # Dropout was active: the same run without it differs.
    expected.dropout = 0.0
    assert not torch.allclose(_seeded_train_step(expected, x, lengths, packed, None)[0],
                              results[0][0])


# ---- rnnfast.convert on a model file written for torch.nn --------------------------------

def test_convert_replaces_every_recurrent_module_in_place():
    model = nn.Sequential(nn.LSTM(3, 4), nn.ModuleList([nn.GRU(4, 4), nn.RNN(4, 4, 2, "relu")]),
                          nn.LSTMCell(4, 4), nn.GRUCell(4, 4), nn.RNNCell(4, 4), nn.Linear(4, 4))
    before = list(model.modules())
    parameters = list(model.parameters())
    random_state = torch.get_rng_state()
    assert rnnfast.convert(model) is model
    assert torch.equal(torch.get_rng_state(), random_state), "convert drew random numbers"
    assert list(model.modules()) == before and list(model.parameters()) == parameters
    for module, name in zip(list(model.modules())[1:],
                            ["LSTM", "ModuleList", "GRU", "RNN", "LSTMCell", "GRUCell",
                             "RNNCell", "Linear"]):
        if hasattr(rnnfast, name):
            assert type(module) is getattr(rnnfast, name)
    assert model[1][1].nonlinearity == "relu" and model[1][1].mode == "RNN_RELU"
    rnnfast.convert(model, to="torch")
    for module in model.modules():
        assert type(module).__module__.startswith("torch.")
        assert "activation" not in module.__dict__


def test_convert_back_refuses_rnnfast_extras():
    model = nn.Sequential(rnnfast.LSTM(3, 4), rnnfast.RNN(4, 4, nonlinearity="sigmoid"))
    with pytest.raises(ValueError, match="sigmoid"):
        rnnfast.convert(model, to="torch")
    assert type(model[0]) is rnnfast.LSTM, "a refused conversion changed the model"
    with pytest.raises(ValueError, match="activation"):
        rnnfast.convert(rnnfast.LSTMCell(3, 4, activation="relu"), to="torch")


def test_convert_keeps_a_parametrization():
    layer = nn.GRU(3, 5, 2, dtype=torch.float64)
    nn.utils.parametrizations.weight_norm(layer, "weight_hh_l1")
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    expected = layer(x)[0]
    rnnfast.convert(layer)
    assert isinstance(layer, rnnfast.GRU)
    assert nn.utils.parametrize.is_parametrized(layer, "weight_hh_l1")
    torch.testing.assert_close(layer(x)[0], expected)


def _word_model_step(model, tokens, targets, hidden):
    log_probabilities, hidden = model(tokens, hidden)
    loss = nn.functional.nll_loss(log_probabilities, targets.view(-1))
    model.zero_grad()
    loss.backward()
    return loss, hidden


def test_convert_word_language_model_same_outputs_and_gradients():
    """An unmodified torch.nn model, converted: the same outputs and gradients in train mode
    (dropout in the model and between the LSTM layers drawn from the same stream)."""
    torch.manual_seed(3)
    # word_language_model's model written for torch.nn (tests/test_clients.py).
    expected = RNNModel(nn, ntoken=17, ninp=6, nhid=8, nlayers=2, dropout=0.3).double()
    actual = rnnfast.convert(copy.deepcopy(expected))
    assert isinstance(actual.rnn, rnnfast.LSTM)
    tokens = torch.randint(0, 17, (9, 3))
    targets = torch.randint(0, 17, (9, 3))
    results = []
    for model in (expected, actual):
        torch.manual_seed(11)
        loss, (h, c) = _word_model_step(model, tokens, targets, model.init_hidden(3))
        results.append([loss, h, c] + [p.grad for p in model.parameters()])
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)


# ---- PyTorch's tooling ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_cpu_autocast_after_a_linear_as_torch_nn(name):
    """Under torch.autocast("cpu", bfloat16) a Linear feeds the layer bfloat16 input: the layer
    runs in bfloat16 as torch.nn's does, and the float32 parameters get float32 gradients."""
    expected, actual = _pair(name, dict(num_layers=2), dtype=torch.float32)
    linear = nn.Linear(4, 3)
    x = torch.randn(6, 2, 4)
    loss_weights = torch.randn(6, 2, 5)
    results = []
    for module in (expected, actual):
        linear.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, _ = module(linear(x))
        (output.float() * loss_weights).sum().backward()
        results.append((output, module.weight_ih_l0.grad, module.weight_hh_l1.grad,
                        linear.weight.grad.clone()))
    for got, want in zip(results[1], results[0], strict=True):
        assert got.dtype == want.dtype
        # bfloat16 keeps 8 significant bits; the two round at different places: 2 units in
        # the last place of a value of magnitude 1.
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=2 ** -6)


@pytest.mark.parametrize("name", NAMES)
def test_jit_script_refused_with_a_pointer_to_trace(name):
    model = nn.Sequential(nn.Identity(), getattr(rnnfast, name)(3, 4))
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace"):
        torch.jit.script(model)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_jit_trace_gives_the_module_outputs():
    module = rnnfast.LSTM(3, 5, num_layers=2, bidirectional=True)
    traced = torch.jit.trace(module, (torch.randn(4, 2, 3),))
    x = torch.randn(4, 2, 3)
    for got, want in zip(traced(x)[1], module(x)[1], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _forward_op_calls(run):
    """How many times run() calls rnnfast's forward op."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        run()
    return sum(event.count for event in profiler.key_averages() if event.key == "rnnfast::forward")


@pytest.mark.parametrize("kind, options", [
    ("GRU", {}), ("RNN", {"nonlinearity": "relu"}), ("GRU", {"num_layers": 2}),
    ("RNN", {"batch_first": True}), ("LSTM", {}), ("LSTM", {"proj_size": 2}),
], ids=str)
def test_output_changed_in_place_before_backward(kind, options):
    """torch.nn's GRU and RNN layers let the caller change their output in place before the
    backward (its LSTM refuses); rnnfast's layers all do, and the gradients are those of the
    values the forward computed, as with the change made out of place."""
    batch_first = options.get("batch_first", False)
    reference = getattr(nn, kind)(3, 5, **options)
    layer = getattr(rnnfast, kind)(3, 5, **options)
    layer.load_state_dict(reference.state_dict())
    x = randn(2, 4, 3) if batch_first else randn(4, 2, 3)
    state_size = options.get("proj_size", 5)
    h0 = randn(options.get("num_layers", 1), 2, state_size)
    hx = (h0, randn(options.get("num_layers", 1), 2, 5)) if kind == "LSTM" else h0
    weights = randn(*x.shape[:2], state_size)

    def gradients(module, in_place):
        inputs = [t.clone().requires_grad_() for t in (x, *(hx if kind == "LSTM" else (hx,)))]
        module.zero_grad()
        state = tuple(inputs[1:]) if kind == "LSTM" else inputs[1]
        output, _ = module(inputs[0], state)
        if in_place:
            output.mul_(weights)
            output[..., :2].add_(1.0)  # through a view, whose change is the output's
        else:
            output = output * weights
            output = torch.cat([output[..., :2] + 1.0, output[..., 2:]], dim=-1)
        (output.tanh() * weights).sum().backward()
        return [t.grad for t in inputs] + [p.grad.clone() for p in module.parameters()]

    expected = gradients(layer, in_place=False)
    # the backward computes the changed output again, and only that
    assert (_forward_op_calls(lambda: gradients(layer, in_place=True))
            == _forward_op_calls(lambda: gradients(layer, in_place=False)) + 1)
    got = gradients(layer, in_place=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    if kind != "LSTM":
        for g, e in zip(got, gradients(reference, in_place=True)):
            torch.testing.assert_close(g, e)
