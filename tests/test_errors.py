"""Bad constructor arguments and bad forward inputs raise errors that name the
argument and, for inputs, say what was expected and what was got."""

import re

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

H_NAME = r"\bhx\b|\bh_?0\b"       # the hidden state argument
C_NAME = r"\bcx\b|\bc_?0\b"       # the LSTM cell state argument
IN_NAME = r"\binput\b"
IN_SIZE_NAME = r"input_size|input\.size"
F32 = r"float32|\bFloat\b"
F64 = r"float64|\bDouble\b"


def num(n):
    """The number n on its own (not part of a larger number)."""
    return rf"(?<![\d.]){n}(?![\d.])"


def shape(*dims):
    """A shape written as (2, 3, 5), [2, 3, 5], torch.Size([2, 3, 5]), 2x3x5 ..."""
    return r"(?<![\d.])" + r"\D{1,4}".join(str(d) for d in dims) + r"(?![\d.])"


def raises(fn, name, *says, exc=(ValueError, RuntimeError)):
    """fn() raises exc whose message matches `name` and every regex in `says`."""
    with pytest.raises(exc, match=name) as info:
        fn()
    msg = str(info.value)
    for pattern in says:
        assert re.search(pattern, msg), f"message does not say {pattern!r}: {msg!r}"
    return msg


# --------------------------------------------------------------------------
# Constructors
# --------------------------------------------------------------------------

LAYERS = ["LSTM", "GRU", "RNN"]
CELLS = ["LSTMCell", "GRUCell", "RNNCell"]


@pytest.mark.parametrize("value", [0, -1])
@pytest.mark.parametrize("mode", LAYERS)
def test_num_layers_below_one(rf, mode, value):
    with pytest.raises(ValueError, match="num_layers"):
        getattr(rf, mode)(3, 4, num_layers=value)


@pytest.mark.parametrize("value", [-0.1, 1.5, 2])
@pytest.mark.parametrize("mode", LAYERS)
def test_dropout_outside_unit_interval(rf, mode, value):
    with pytest.raises(ValueError, match="dropout"):
        getattr(rf, mode)(3, 4, num_layers=2, dropout=value)


@pytest.mark.parametrize("mode", LAYERS)
def test_dropout_bounds_are_allowed(rf, mode):
    getattr(rf, mode)(3, 4, num_layers=2, dropout=0.0)
    getattr(rf, mode)(3, 4, num_layers=2, dropout=1.0)


@pytest.mark.parametrize("value", [-1, 4, 5])
def test_proj_size_out_of_range(rf, value):
    with pytest.raises(ValueError, match="proj_size"):
        rf.LSTM(3, 4, proj_size=value)


@pytest.mark.parametrize("mode", ["GRU", "RNN"])
def test_proj_size_is_not_an_argument_of_gru_rnn(rf, mode):
    # torch.nn's exception type: a ValueError.
    with pytest.raises(ValueError, match="proj_size"):
        getattr(rf, mode)(3, 4, proj_size=2)


@pytest.mark.parametrize("mode,argument", [
    ("GRU", "activation"), ("GRU", "nonlinearity"), ("RNN", "activation"), ("LSTM", "nonlinearity"),
    ("GRUCell", "activation"), ("GRUCell", "nonlinearity"), ("RNNCell", "activation"),
    ("LSTMCell", "nonlinearity"), ("LSTMCell", "proj_size"),
])
def test_no_such_argument(rf, mode, argument):
    with pytest.raises(TypeError, match=argument):
        getattr(rf, mode)(3, 4, **{argument: "tanh" if argument != "proj_size" else 2})


@pytest.mark.parametrize("value", ["foo", "gelu", "Tanh", None])
def test_unknown_nonlinearity(rf, value):
    with pytest.raises(ValueError, match="nonlinearity"):
        rf.RNN(3, 4, nonlinearity=value)


@pytest.mark.parametrize("value", ["foo", "gelu", "Tanh", None])
def test_unknown_cell_nonlinearity_is_an_error_of_the_call(rf, value):
    """As torch.nn.RNNCell: the nonlinearity is read (and refused) at each call."""
    cell = rf.RNNCell(3, 4, nonlinearity=value)
    with pytest.raises(RuntimeError, match="nonlinearity"):
        cell(torch.randn(2, 3))


@pytest.mark.parametrize("value", ["foo", "gelu", "Tanh", None])
@pytest.mark.parametrize("mode", ["LSTM", "LSTMCell"])
def test_unknown_activation(rf, mode, value):
    with pytest.raises(ValueError, match="activation"):
        getattr(rf, mode)(3, 4, activation=value)


@pytest.mark.parametrize("mode", LAYERS)
def test_hidden_size_zero(rf, mode):
    with pytest.raises(ValueError, match="hidden_size"):
        getattr(rf, mode)(3, 0)


# --------------------------------------------------------------------------
# Forward: layers.  Module: input_size 3, hidden 5, 2 layers, bidirectional
# (4 = layers * directions), batch 2, T 6; LSTM projection 3 where used.
# --------------------------------------------------------------------------

def make(rf, mode, device, proj_size=0, dtype=torch.float32, **kw):
    kw = dict(kw)
    if proj_size:
        kw["proj_size"] = proj_size
    return getattr(rf, mode)(3, 5, num_layers=2, bidirectional=True, device=device, dtype=dtype, **kw)


def states(mode, device, h_shape=(4, 2, 5), c_shape=(4, 2, 5), h_dtype=torch.float32,
           c_dtype=torch.float32):
    h = torch.randn(h_shape, dtype=h_dtype, device=device)
    if mode == "LSTM":
        return (h, torch.randn(c_shape, dtype=c_dtype, device=device))
    return h


@pytest.mark.parametrize("mode", LAYERS)
def test_valid_call_for_reference(rf, mode, device):
    """The baseline the error tests below perturb one thing of."""
    m = make(rf, mode, device)
    x = torch.randn(6, 2, 3, device=device)
    m(x, states(mode, device))
    m(x[:, 0], states(mode, device, (4, 5), (4, 5)))
    rf.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=3, device=device)(
        x, states("LSTM", device, (4, 2, 3), (4, 2, 5)))


@pytest.mark.parametrize("rank", [1, 4])
@pytest.mark.parametrize("mode", LAYERS)
def test_input_wrong_rank(rf, mode, device, rank):
    m = make(rf, mode, device)
    x = torch.randn((3,) if rank == 1 else (6, 2, 1, 3), device=device)
    raises(lambda: m(x), IN_NAME, num(2), num(3), num(rank))


@pytest.mark.parametrize("layout", ["batched", "unbatched", "packed"])
@pytest.mark.parametrize("mode", LAYERS)
def test_input_size_mismatch(rf, mode, device, layout):
    m = make(rf, mode, device)
    x = torch.randn(6, 2, 7, device=device)
    if layout == "unbatched":
        x = x[:, 0]
    elif layout == "packed":
        x = pack_padded_sequence(x, torch.tensor([6, 4]))
    raises(lambda: m(x), IN_SIZE_NAME, num(3), num(7))


@pytest.mark.parametrize("which", ["layers", "batch", "hidden"])
@pytest.mark.parametrize("mode", LAYERS)
def test_h0_wrong_shape(rf, mode, device, which):
    m = make(rf, mode, device)
    x = torch.randn(6, 2, 3, device=device)
    bad = {"layers": (3, 2, 5), "batch": (4, 7, 5), "hidden": (4, 2, 8)}[which]
    raises(lambda: m(x, states(mode, device, h_shape=bad)), H_NAME, shape(4, 2, 5), shape(*bad))


@pytest.mark.parametrize("which", ["layers", "batch", "hidden"])
def test_c0_wrong_shape(rf, device, which):
    m = make(rf, "LSTM", device)
    x = torch.randn(6, 2, 3, device=device)
    bad = {"layers": (3, 2, 5), "batch": (4, 7, 5), "hidden": (4, 2, 8)}[which]
    raises(lambda: m(x, states("LSTM", device, c_shape=bad)), C_NAME, shape(4, 2, 5), shape(*bad))


def test_projected_lstm_state_sizes(rf, device):
    """With proj_size 3: h0 is (4, B, 3) and c0 is (4, B, 5); swapping them is an error."""
    m = make(rf, "LSTM", device, proj_size=3)
    x = torch.randn(6, 2, 3, device=device)
    raises(lambda: m(x, states("LSTM", device, (4, 2, 5), (4, 2, 5))), H_NAME, shape(4, 2, 3), shape(4, 2, 5))
    raises(lambda: m(x, states("LSTM", device, (4, 2, 3), (4, 2, 3))), C_NAME, shape(4, 2, 5), shape(4, 2, 3))


@pytest.mark.parametrize("mode", LAYERS)
def test_h0_wrong_shape_unbatched(rf, mode, device):
    m = make(rf, mode, device)
    x = torch.randn(6, 3, device=device)
    # 3-D hx with unbatched (2-D) input
    raises(lambda: m(x, states(mode, device, (4, 1, 5), (4, 5))), H_NAME)
    # wrong number of layers*directions
    raises(lambda: m(x, states(mode, device, (2, 5), (4, 5))), H_NAME, shape(4, 5), shape(2, 5))
    if mode == "LSTM":
        raises(lambda: m(x, states(mode, device, (4, 5), (4, 1, 5))), C_NAME)


@pytest.mark.parametrize("mode", LAYERS)
def test_h0_unbatched_with_batched_input(rf, mode, device):
    m = make(rf, mode, device)
    x = torch.randn(6, 2, 3, device=device)
    raises(lambda: m(x, states(mode, device, (4, 5), (4, 2, 5))), H_NAME)


@pytest.mark.parametrize("mode", LAYERS)
def test_h0_wrong_batch_with_packed_input(rf, mode, device):
    m = make(rf, mode, device)
    x = pack_padded_sequence(torch.randn(6, 2, 3, device=device), torch.tensor([4, 6]),
                             enforce_sorted=False)
    raises(lambda: m(x, states(mode, device, (4, 3, 5), (4, 2, 5))), H_NAME, shape(4, 2, 5), shape(4, 3, 5))
    if mode == "LSTM":
        raises(lambda: m(x, states(mode, device, (4, 2, 5), (4, 3, 5))), C_NAME, shape(4, 2, 5), shape(4, 3, 5))


@pytest.mark.parametrize("layout", ["batched", "unbatched", "packed"])
@pytest.mark.parametrize("mode", LAYERS)
def test_input_dtype_mismatch(rf, mode, device, layout):
    m = make(rf, mode, device)
    x = torch.randn(6, 2, 3, dtype=torch.float64, device=device)
    if layout == "unbatched":
        x = x[:, 0]
    elif layout == "packed":
        x = pack_padded_sequence(x, torch.tensor([6, 4]))
    raises(lambda: m(x), IN_NAME, F32, F64)


@pytest.mark.parametrize("mode", LAYERS)
def test_float32_input_into_float64_module(rf, mode, device):
    m = make(rf, mode, device, dtype=torch.float64)
    raises(lambda: m(torch.randn(6, 2, 3, device=device)), IN_NAME, F32, F64)


@pytest.mark.parametrize("mode", LAYERS)
def test_h0_dtype_mismatch(rf, mode, device):
    m = make(rf, mode, device)
    x = torch.randn(6, 2, 3, device=device)
    raises(lambda: m(x, states(mode, device, h_dtype=torch.float64)), H_NAME, F32, F64)


def test_c0_dtype_mismatch(rf, device):
    m = make(rf, "LSTM", device)
    x = torch.randn(6, 2, 3, device=device)
    raises(lambda: m(x, states("LSTM", device, c_dtype=torch.float64)), C_NAME, F32, F64)


def test_lstm_hx_must_be_a_tuple(rf, device):
    m = make(rf, "LSTM", device)
    x = torch.randn(6, 2, 3, device=device)
    # A wrong Python type is a TypeError (torch.nn's LSTMCell raises one too).
    raises(lambda: m(x, torch.randn(4, 2, 5, device=device)), r"\bhx\b", "tuple",
           exc=TypeError)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", LAYERS)
def test_device_mismatch(rf, mode):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    m = make(rf, mode, cuda)
    raises(lambda: m(torch.randn(6, 2, 3)), IN_NAME, "cuda", "cpu")
    x = torch.randn(6, 2, 3, device=cuda)
    raises(lambda: m(x, states(mode, cpu)), H_NAME if mode != "LSTM" else rf"{H_NAME}|{C_NAME}",
           "cuda", "cpu")
    if mode == "LSTM":
        hx = (torch.randn(4, 2, 5, device=cuda), torch.randn(4, 2, 5))
        raises(lambda: m(x, hx), C_NAME, "cuda", "cpu")


# --------------------------------------------------------------------------
# Forward: cells.  input_size 3, hidden 5, batch 2.
# --------------------------------------------------------------------------

def make_cell(rf, mode, device, dtype=torch.float32):
    return getattr(rf, mode)(3, 5, device=device, dtype=dtype)


def cell_states(mode, device, h_shape=(2, 5), c_shape=(2, 5), h_dtype=torch.float32, c_dtype=torch.float32):
    h = torch.randn(h_shape, dtype=h_dtype, device=device)
    if mode == "LSTMCell":
        return (h, torch.randn(c_shape, dtype=c_dtype, device=device))
    return h


@pytest.mark.parametrize("mode", CELLS)
def test_cell_valid_call_for_reference(rf, mode, device):
    m = make_cell(rf, mode, device)
    m(torch.randn(2, 3, device=device), cell_states(mode, device))
    m(torch.randn(3, device=device), cell_states(mode, device, (5,), (5,)))


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("mode", CELLS)
def test_cell_input_wrong_rank(rf, mode, device, rank):
    m = make_cell(rf, mode, device)
    x = torch.randn(()) if rank == 0 else torch.randn(4, 2, 3)
    raises(lambda: m(x.to(device)), IN_NAME, num(1), num(2), num(rank))


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("mode", CELLS)
def test_cell_input_size_mismatch(rf, mode, device, unbatched):
    m = make_cell(rf, mode, device)
    x = torch.randn(7, device=device) if unbatched else torch.randn(2, 7, device=device)
    raises(lambda: m(x), IN_SIZE_NAME, num(3), num(7))


@pytest.mark.parametrize("bad", [(3, 5), (2, 8), (5,), (1, 2, 5)])
@pytest.mark.parametrize("mode", CELLS)
def test_cell_h_wrong_shape(rf, mode, device, bad):
    m = make_cell(rf, mode, device)
    x = torch.randn(2, 3, device=device)
    raises(lambda: m(x, cell_states(mode, device, h_shape=bad)), H_NAME)
    if len(bad) == 2:
        raises(lambda: m(x, cell_states(mode, device, h_shape=bad)), H_NAME, shape(2, 5), shape(*bad))


@pytest.mark.parametrize("bad", [(3, 5), (2, 8), (5,)])
def test_lstm_cell_c_wrong_shape(rf, device, bad):
    m = make_cell(rf, "LSTMCell", device)
    x = torch.randn(2, 3, device=device)
    raises(lambda: m(x, cell_states("LSTMCell", device, c_shape=bad)), C_NAME)
    if len(bad) == 2:
        raises(lambda: m(x, cell_states("LSTMCell", device, c_shape=bad)), C_NAME, shape(2, 5), shape(*bad))


@pytest.mark.parametrize("mode", CELLS)
def test_cell_unbatched_input_with_batched_h(rf, mode, device):
    m = make_cell(rf, mode, device)
    raises(lambda: m(torch.randn(3, device=device), cell_states(mode, device, (1, 5), (5,))), H_NAME)


@pytest.mark.parametrize("mode", CELLS)
def test_cell_input_dtype_mismatch(rf, mode, device):
    m = make_cell(rf, mode, device)
    raises(lambda: m(torch.randn(2, 3, dtype=torch.float64, device=device)), IN_NAME, F32, F64)


@pytest.mark.parametrize("mode", CELLS)
def test_cell_h_dtype_mismatch(rf, mode, device):
    m = make_cell(rf, mode, device)
    x = torch.randn(2, 3, device=device)
    raises(lambda: m(x, cell_states(mode, device, h_dtype=torch.float64)), H_NAME, F32, F64)
    if mode == "LSTMCell":
        raises(lambda: m(x, cell_states(mode, device, c_dtype=torch.float64)), C_NAME, F32, F64)


def test_lstm_cell_hx_must_be_a_tuple(rf, device):
    m = make_cell(rf, "LSTMCell", device)
    raises(lambda: m(torch.randn(2, 3, device=device), torch.randn(2, 5, device=device)),
           r"\bhx\b", "tuple", exc=TypeError)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", CELLS)
def test_cell_device_mismatch(rf, mode):
    cuda = torch.device("cuda")
    m = make_cell(rf, mode, cuda)
    raises(lambda: m(torch.randn(2, 3)), IN_NAME, "cuda", "cpu")
    x = torch.randn(2, 3, device=cuda)
    if mode == "LSTMCell":
        raises(lambda: m(x, (torch.randn(2, 5), torch.randn(2, 5, device=cuda))), H_NAME, "cuda", "cpu")
        raises(lambda: m(x, (torch.randn(2, 5, device=cuda), torch.randn(2, 5))), C_NAME, "cuda", "cpu")
    else:
        raises(lambda: m(x, torch.randn(2, 5)), H_NAME, "cuda", "cpu")


def _packed_batch_of_four():
    """A PackedSequence of 4 sequences (lengths 5, 4, 3, 1) and 4 features, unsorted order."""
    return pack_padded_sequence(torch.randn(5, 4, 4), torch.tensor([3, 5, 1, 4]),
                                enforce_sorted=False)


def _tampered(field, value):
    packed = _packed_batch_of_four()
    parts = packed._asdict()
    parts[field] = value(parts[field])
    return PackedSequence(**parts)


TAMPERED_PACKED = {
    "negative batch size": ("batch_sizes", lambda b: torch.tensor([4, -3, 3, 2, 1])),
    "increasing batch sizes": ("batch_sizes", lambda b: torch.tensor([3, 4, 2, 2, 2])),
    "zero batch size": ("batch_sizes", lambda b: torch.tensor([4, 3, 3, 3, 0])),
    "sum past the data": ("batch_sizes", lambda b: torch.tensor([4, 3, 3, 2, 2])),
    "sum short of the data": ("batch_sizes", lambda b: torch.tensor([4, 3, 3, 2])),
    "int32 batch sizes": ("batch_sizes", lambda b: b.int()),
    "2-D batch sizes": ("batch_sizes", lambda b: b.view(1, -1)),
    "sorted index out of range": ("sorted_indices", lambda i: torch.tensor([1, 3, 0, 9])),
    "repeated sorted index": ("sorted_indices", lambda i: torch.tensor([1, 1, 0, 2])),
    "too few sorted indices": ("sorted_indices", lambda i: i[:3]),
    "unsorted indices not the inverse": ("unsorted_indices", lambda i: i.flip(0)),
}


@pytest.mark.parametrize("case", sorted(TAMPERED_PACKED))
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_tampered_packed_sequence_is_refused(rf, mode, case):
    """A PackedSequence whose batch_sizes or indices no packing could make: a RuntimeError that
    names what is wrong, before the engine reads memory by those numbers (a negative batch
    size crashed the interpreter)."""
    if getattr(rf, "IS_TORCH_NN", False):
        pytest.skip("torch.nn reads some of these without checking them")
    field, value = TAMPERED_PACKED[case]
    module = getattr(rf, mode)(4, 8)
    with pytest.raises(RuntimeError, match=field):
        module(_tampered(field, value))


def test_untampered_packed_sequence_runs(rf):
    """The checks of a PackedSequence pass what pack_padded_sequence makes."""
    output, _ = rf.GRU(4, 8)(_packed_batch_of_four())
    assert output.batch_sizes.tolist() == [4, 3, 3, 2, 1]


# --------------------------------------------------------------------------
# Arguments of the wrong kind: torch.nn's exception type, our message
# --------------------------------------------------------------------------

def _wrong_kinds():
    """(module name, a forward call's arguments), one argument of the wrong kind."""
    x, step = torch.randn(5, 3, 4), torch.randn(3, 4)
    h, h_step = torch.randn(1, 3, 6), torch.randn(3, 6)
    return [
        ("GRU", (x, (h,))), ("GRU", (x, [h])), ("GRU", (x, 3)), ("RNN", (x, (None,))),
        ("LSTM", (x, h)), ("LSTM", (x, (h,))), ("LSTM", (x, (h, h, h))), ("LSTM", (x.tolist(),)),
        ("GRU", (x.numpy(),)), ("RNN", ([x],)),
        ("GRUCell", (step, (h_step,))), ("RNNCell", (step.tolist(),)),
        ("LSTMCell", (step, h_step)), ("LSTMCell", (step, (h_step,))),
        ("LSTMCell", (step, (h_step, h_step, h_step))), ("LSTMCell", (step, (h_step, 5))),
    ]


@pytest.mark.parametrize("index", range(len(_wrong_kinds())))
def test_wrong_kind_of_argument_raises_torch_nn_exception_type(rf, index):
    """Code that catches the exception torch.nn raises (often an accident of its code, such as
    an AttributeError from calling .dim() on a tuple) catches rnnfast's too, whose message names
    the argument."""
    mode, args = _wrong_kinds()[index]
    with pytest.raises(Exception) as expected:
        getattr(torch.nn, mode)(4, 6)(*args)
    with pytest.raises(type(expected.value)) as got:
        getattr(rf, mode)(4, 6)(*args)
    assert re.search(r"\bhx\b|\bh_0\b|\bc_0\b|\binput\b", str(got.value)), str(got.value)


def _tampered_packed_sequences():
    packed = pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor([5, 3, 2]))
    return [PackedSequence.__new__(PackedSequence, packed.data, batch_sizes, None, None)
            for batch_sizes in (torch.tensor([3.0, 3, 2, 1, 1]), torch.tensor([[3, 3, 2, 1, 1]]),
                                torch.tensor([], dtype=torch.int64))]


@pytest.mark.parametrize("index", range(3))
@pytest.mark.parametrize("mode", LAYERS)
def test_tampered_packed_sequence_raises_torch_nn_exception_type(rf, mode, index):
    """batch_sizes of floats, of 2-D, empty: torch.nn's TypeError, TypeError, IndexError."""
    sequence = _tampered_packed_sequences()[index]
    with pytest.raises(Exception) as expected:
        getattr(torch.nn, mode)(4, 6)(sequence)
    with pytest.raises(type(expected.value), match="batch_sizes"):
        getattr(rf, mode)(4, 6)(sequence)
