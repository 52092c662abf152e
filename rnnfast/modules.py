"""Drop-in replacements for torch.nn.LSTM, GRU, RNN and their cells.

The cells are subclasses of torch.nn's (isinstance(rnnfast.LSTMCell(...), nn.LSTMCell)); the
layers are subclasses of torch.nn.RNNBase, not of nn.LSTM / GRU / RNN: TorchDynamo refuses to
trace any instance of those three (torch._dynamo.config.allow_rnn), which would take
torch.compile from rnnfast's layers. Each is built by torch.nn's own constructor: the same
arguments, defaults, checks, parameter names and shapes (state_dicts move both ways),
initialisation, repr and RNNBase surface (_flat_weights, all_weights, flatten_parameters). Only
the forward differs: it checks its arguments as torch.nn does, raising torch.nn's exception
types with torch.nn's wording, and runs rnnfast's fused ops. Beyond torch.nn, as Keras has
them: RNN(nonlinearity='sigmoid') and LSTM(activation='relu' | 'sigmoid') for the cell
candidate and the cell state.
"""
import numbers

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rnnfast import _onnx, _ops, functional

_LSTM_ACTIVATIONS = ("tanh", "relu", "sigmoid")
_RNN_NONLINEARITIES = ("tanh", "relu", "sigmoid")
# The modes torch.nn.RNNBase knows (and cuDNN can flatten weights for).
_TORCH_MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


class NotATensorError(TypeError, AttributeError):
    """A tensor argument (input, hx) that is not a tensor. A TypeError, and an AttributeError as
    torch.nn's layers raise there (they call .dim() on it), so that code written against either
    catches it."""


class HiddenStatePairError(TypeError, IndexError, RuntimeError):
    """An LSTM's or LSTMCell's hx that is not a pair (h_0, c_0). A TypeError, and what torch.nn
    raises there: IndexError (LSTM: a tensor or a 1-tuple, whose hx[1] it takes) or RuntimeError
    (other lengths)."""


class PackedSequenceError(RuntimeError, TypeError, IndexError):
    """A PackedSequence that pack_padded_sequence would not make (its batch_sizes or indices
    tampered with). A RuntimeError, and what torch.nn raises on some such sequences by accident
    of its code: TypeError (batch_sizes of floats or of 2-D) or IndexError (empty batch_sizes)."""


def _not_a_pair(hx):
    """How an hx that is not a pair is described in an error: its type, and its length."""
    if isinstance(hx, (tuple, list)):
        return f"a {type(hx).__name__} of {len(hx)}"
    return type(hx).__name__


def _lstm_not_a_pair(name, hx):
    """The error for an LSTM's hx that is not a pair: torch.nn's wording where its own code
    says something of such an hx (a sequence of 3 or more states: 'lstm expects two hidden
    states'; of 0 or 1, the IndexError of taking hx[1]), then rnnfast's detail."""
    detail = f"hx must be a tuple (h_0, c_0), got {_not_a_pair(hx)}"
    if isinstance(hx, (tuple, list)):
        words = ("lstm expects two hidden states" if len(hx) > 2
                 else f"{type(hx).__name__} index out of range")
        return HiddenStatePairError(f"{name}: {words} ({detail})")
    return HiddenStatePairError(f"{name}: {detail}")


def _lstm_cell_not_a_pair(hx):
    """The error for an LSTMCell's hx that is not a pair: torch.nn's lstm_cell's words for such
    an hx, then rnnfast's detail."""
    if isinstance(hx, (tuple, list)):
        words = "lstm_cell expects two hidden states"
    elif isinstance(hx, torch.Tensor):
        words = "lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, not Tensor"
    else:
        words = f"'{type(hx).__name__}' object is not iterable"
    return HiddenStatePairError(f"LSTMCell: {words} (hx must be a tuple (h, c), got "
                                f"{_not_a_pair(hx)})")


def _shape(t):
    return tuple(t.shape)


def _no_dim(value):
    """torch.nn's error for a value that is not a tensor where it calls .dim() on it."""
    return f"'{type(value).__name__}' object has no attribute 'dim'"


def _scalar_type_name(dtype):
    """ATen's name of a dtype in its messages: Float, Double, BFloat16, Long ..."""
    return torch.empty((), dtype=dtype).type().rsplit(".", 1)[-1].removesuffix("Tensor")


def _check_matches(owner, argument, tensor, reference, reference_name, multiplied=False):
    """dtype and device of `tensor` must be those of `reference` (named reference_name); under
    autocast, where the op casts its tensors to one dtype, the device only. multiplied: torch.nn
    multiplies `tensor` by a weight of reference's dtype there, and its error is that product's
    (mat1 and mat2)."""
    if tensor.dtype != reference.dtype and not torch._C._is_any_autocast_enabled():
        detail = (f"{argument} must have the dtype of {reference_name} ({reference.dtype}), got "
                  f"{tensor.dtype}")
        if multiplied:
            raise RuntimeError(f"{owner}: mat1 and mat2 must have the same dtype, but got "
                               f"{_scalar_type_name(tensor.dtype)} and "
                               f"{_scalar_type_name(reference.dtype)} ({detail})")
        raise RuntimeError(f"{owner}: {detail}")
    if tensor.device != reference.device:
        raise RuntimeError(f"{owner}: {argument} must be on the device of {reference_name} "
                           f"({reference.device}), got {tensor.device}")


def _refuse_scripting(module):
    raise RuntimeError(
        f"rnnfast.{type(module).__name__} cannot be compiled by torch.jit.script: its forward "
        "is Python around rnnfast's compiled op. Use torch.jit.trace(model, example_inputs) "
        "(or torch.compile / torch.export), or rnnfast.convert(model, to='torch') to script "
        "torch.nn's layers.")


def _check_input_dtype(input, weight):
    """torch.nn.RNNBase.check_input's dtype check, with its exception type and wording."""
    if input.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():
        raise ValueError(
            f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
            f"Convert input: input.to({weight.dtype}), or convert model: "
            f"model.to({input.dtype})")


class _RecurrentLayer:
    """What rnnfast's LSTM, GRU and RNN put in front of torch.nn.RNNBase (listed before the
    torch.nn class among the bases): the forward on rnnfast's ops, with torch.nn's checks."""

    # torch.nn's name for the module in its messages ("LSTM: Expected input to be 2D or 3D").
    _kind = ""
    # torch.nn's wording of a wrong input rank ends "got 4D instead" (LSTM, GRU) or
    # "got 4D tensor instead" (RNN).
    _rank_noun = ""

    # torch.jit.script calls it on the module and each submodule before compiling.
    __prepare_scriptable__ = _refuse_scripting

    def flatten_parameters(self):
        """torch.nn's: on CUDA with cuDNN, the parameters become views of one buffer
        (rnnfast's engines read them either way); elsewhere, and for cells torch.nn has no
        mode for, nothing to do."""
        if self.mode in _TORCH_MODES:
            super().flatten_parameters()

    # The cell options beyond torch.nn (functional.CellOptions), all off unless _init_options
    # was given some; and the names of layer_norm's parameters.
    _options = functional.CellOptions()
    _norm_names = ()

    def _init_options(self, layer_norm=False, zoneout=0.0, zoneout_cell=0.0,
                      recurrent_dropout=0.0, input_dropout=0.0):
        """Checks the cell options and, with layer_norm, adds its parameters (gains 1, the
        LSTM cell state's bias 0) for each layer and direction."""
        name = type(self).__name__
        if not isinstance(layer_norm, bool):
            raise TypeError(f"{name}: layer_norm must be a bool, got {_describe(layer_norm)}")
        for argument, p in (("zoneout", zoneout), ("zoneout_cell", zoneout_cell),
                            ("recurrent_dropout", recurrent_dropout),
                            ("input_dropout", input_dropout)):
            _check_probability(name, argument, p)
        options = functional.CellOptions(layer_norm, float(zoneout), float(zoneout_cell),
                                         float(recurrent_dropout), float(input_dropout))
        if not options.any():
            return  # the class's default: a module without options pickles as before
        self._options = options
        if not layer_norm:
            return
        weight = self.weight_ih_l0
        gates = weight.shape[0]
        factory = {"dtype": weight.dtype, "device": weight.device}
        names = []
        for layer in range(self.num_layers):
            for direction in range(2 if self.bidirectional else 1):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                shapes = {f"layer_norm_ih_weight{suffix}": gates,
                          f"layer_norm_hh_weight{suffix}": gates}
                if self.mode == "LSTM":
                    shapes[f"layer_norm_cell_weight{suffix}"] = self.hidden_size
                    if self.bias:
                        shapes[f"layer_norm_cell_bias{suffix}"] = self.hidden_size
                for parameter, size in shapes.items():
                    self.register_parameter(parameter,
                                            nn.Parameter(torch.empty(size, **factory)))
                    names.append(parameter)
        self._norm_names = tuple(names)
        self._reset_norms()

    def _reset_norms(self):
        with torch.no_grad():
            for parameter in self._norm_names:
                getattr(self, parameter).fill_(0.0 if "_cell_bias" in parameter else 1.0)

    def reset_parameters(self):
        super().reset_parameters()
        self._reset_norms()

    def _layer_norms(self):
        """(norm_ih_weight, norm_hh_weight, norm_cell_weight, norm_cell_bias) per layer and
        direction, None where the module has none; None without layer_norm."""
        if not self._norm_names:
            return None
        parameters = self._parameters
        per_layer = 4 if self.mode == "LSTM" and self.bias else 3 if self.mode == "LSTM" else 2
        norms = []
        for start in range(0, len(self._norm_names), per_layer):
            # From the parameter dict where they are there (Module.__getattr__ is slow at this
            # call rate); a parametrization (weight_norm) computes them at the attribute.
            chunk = [parameters[name] if name in parameters else getattr(self, name)
                     for name in self._norm_names[start:start + per_layer]]
            norms.append(tuple(chunk + [None] * (4 - len(chunk))))
        return norms

    def _options_repr(self):
        return _options_repr(self._options)

    def _layer_weights(self):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) per layer and direction in torch.nn's order (l0,
        l0_reverse, l1, ...), None where the module has none; from _flat_weights, as torch.nn's
        forward reads them."""
        # Straight from the parameter dict: Module.__getattr__ is slow at this call rate.
        parameters = self._parameters
        for name, weight in zip(self._flat_weights_names, self._flat_weights):
            if parameters.get(name) is not weight:
                # A parametrization (weight_norm), pruning or functional_call has put a
                # computed tensor in the parameter's place: refreshed as torch.nn does.
                self._update_flat_weights()
                break
        flat = self._flat_weights
        count = len(flat) // (self.num_layers * (2 if self.bidirectional else 1))
        weights = []
        for start in range(0, len(flat), count):
            chunk = flat[start:start + count]
            biases = (chunk[2], chunk[3]) if self.bias else (None, None)
            weights.append((chunk[0], chunk[1], *biases,
                            chunk[-1] if self.proj_size > 0 else None))
        return weights

    def _check_state(self, state, argument, expected, message, batched, input):
        """A state's shape, checked on its batched form as torch.nn does (with torch.nn's
        message, and the shape in the caller's terms where the state is unbatched), then its
        dtype and device."""
        name = type(self).__name__
        if _shape(state) != expected:
            text = f"{name}: {argument}: " + message.format(expected, list(state.shape))
            if not batched:
                text += (f" (for unbatched input: shape {(expected[0], expected[2])}, got "
                         f"{_shape(state.squeeze(1))})")
            raise RuntimeError(text)
        # torch.nn's GRU and RNN layers multiply the state by W_hh, whose error a wrong dtype
        # gets; its LSTM (oneDNN's) raises an error of its own kernel's.
        _check_matches(name, argument, state, input, "input", multiplied=self.mode != "LSTM")

    def _run(self, input, hx):
        """Shared forward: returns (output, h_n, c_n or None) in torch.nn's layout.

        hx is None, a Tensor (GRU / RNN) or a tuple (h_0, c_0) (LSTM); its shape follows the
        input: [L * D, B, P] for batched input, [L * D, P] for unbatched.
        """
        options = self._options
        if (not self.bidirectional
                and not torch.compiler.is_compiling()
                and not torch._C._are_functorch_transforms_active()):
            # The plain case in C++ (checks included), or NotImplemented for what needs the
            # rest of this function: its errors, unbatched or packed input. With cell options
            # likewise, where they draw no masks (layer_norm; zoneout in evaluation).
            arguments = (self._cell, input, hx, self._parameters, self._flat_weights_names,
                         self._flat_weights, self.input_size, self.batch_first, self.num_layers,
                         self.dropout, self.training)
            if not options.acting(self.training):
                result = _ops._C.plain_layers(*arguments)
            elif not options.draws_masks(self.training):
                result = _ops._C.options_layers(*arguments, self._norm_names, options.zoneout,
                                                options.zoneout_cell)
            else:
                result = NotImplemented
            if result is not NotImplemented:
                return result
        name = type(self).__name__
        is_lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        directions = 2 if self.bidirectional else 1
        state_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        weights = self._layer_weights()
        weight = weights[0][0]  # weight_ih_l0
        if packed:
            _check_packed_sequence(name, input)
            batch_sizes = input.batch_sizes
            steps = batch_sizes.size(0)
            # [T, B, I] in the packed (sorted by length) batch order, and lengths [B]. Under
            # torch.compile _pad and _pack run outside the graph (a graph break around each), as
            # torch.nn's layers run there: their output shapes are the values of batch_sizes and
            # lengths, which tracing cannot know; the layers between them are traced, on a
            # padded sequence of symbolic T and B.
            pad = functional._outside_graph(_pad) if torch.compiler.is_compiling() else _pad
            sequence, lengths_cpu = pad(input.data, batch_sizes, steps)
            batched = True
        else:
            if not isinstance(input, torch.Tensor):
                raise NotATensorError(f"{name}: {_no_dim(input)} (input must be a Tensor or a "
                                      f"PackedSequence, got {type(input).__name__})")
            if input.dim() not in (2, 3):
                raise ValueError(f"{self._kind}: Expected input to be 2D or 3D, got "
                                 f"{input.dim()}D{self._rank_noun} instead")
            batched = input.dim() == 3
            sequence = input
            if not batched:
                sequence = sequence.unsqueeze(1)

        h0 = c0 = None  # None: zero initial states, which the engines need not read
        if hx is not None:
            if is_lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise _lstm_not_a_pair(name, hx)
                h0, c0 = hx
            else:
                h0 = hx
            for argument, state in (("h_0 (hx[0])" if is_lstm else "hx", h0),
                                    ("c_0 (hx[1])", c0)):
                if state is not None and not isinstance(state, torch.Tensor):
                    raise NotATensorError(f"{name}: {_no_dim(state)} ({argument} must be a "
                                          f"Tensor, got {type(state).__name__})")
            if not packed:
                expected_dim = 3 if batched else 2
                ranks = [h0.dim()] + ([c0.dim()] if is_lstm else [])
                if any(rank != expected_dim for rank in ranks):
                    kind = "batched 3-D" if batched else "unbatched 2-D"
                    if is_lstm:
                        raise RuntimeError(f"For {kind} input, hx and cx should also be "
                                           f"{expected_dim}-D but got ({ranks[0]}-D, "
                                           f"{ranks[1]}-D) tensors")
                    raise RuntimeError(f"For {kind} input, hx should also be {expected_dim}-D "
                                       f"but got {ranks[0]}-D tensor")

        _check_input_dtype(sequence, weight)
        # The ops take a batch_first input [B, T, I] as it is and return a batch_first output. A
        # stack of bidirectional layers runs time-major: their concatenated outputs would be
        # copied time-major again for each next layer.
        batch_first_io = self.batch_first and batched and not packed
        batch_first = batch_first_io and not (self.bidirectional and self.num_layers > 1)
        if batch_first_io and not batch_first:
            sequence = sequence.transpose(0, 1)
        if sequence.size(-1) != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {sequence.size(-1)}")
        _check_matches(name, "input", sequence, weight, "the module's parameters")
        batch = sequence.size(0 if batch_first else 1)

        if hx is not None:
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
            layers = self.num_layers * directions
            self._check_state(h0, "h_0 (hx[0])" if is_lstm else "hx",
                              (layers, batch, state_size),
                              "Expected hidden[0] size {}, got {}" if is_lstm
                              else "Expected hidden size {}, got {}", batched, sequence)
            if is_lstm:
                self._check_state(c0, "c_0 (hx[1])", (layers, batch, self.hidden_size),
                                  "Expected hidden[1] size {}, got {}", batched, sequence)
            if packed and input.sorted_indices is not None:
                h0 = h0.index_select(1, input.sorted_indices)
                c0 = c0.index_select(1, input.sorted_indices) if c0 is not None else None
        if sequence.size(1 if batch_first else 0) == 0:
            raise RuntimeError(f"{name}: Expected sequence length to be larger than 0 in RNN")

        lengths = lengths_cpu.to(sequence.device) if packed else None
        if options.acting(self.training):
            output, h_n, c_n = functional.stacked_with_options(
                self._cell, sequence, h0, c0, weights, self._layer_norms(), self.num_layers,
                self.bidirectional, options, self.dropout, self.training, lengths,
                batch_first)
        else:
            output, h_n, c_n = functional.stacked(
                self._cell, sequence, h0, c0, weights, self.num_layers, self.bidirectional,
                self.dropout, self.training, lengths, batch_first)

        if packed:
            pack = functional._outside_graph(_pack) if torch.compiler.is_compiling() else _pack
            data = pack(output, lengths_cpu)
            output = PackedSequence(data, input.batch_sizes, input.sorted_indices,
                                    input.unsorted_indices)
            if input.unsorted_indices is not None:
                h_n = h_n.index_select(1, input.unsorted_indices)
                c_n = c_n.index_select(1, input.unsorted_indices) if c_n is not None else None
        elif not batched:
            output = output.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif batch_first_io and not batch_first:
            output = output.transpose(0, 1)
        return output, h_n, c_n


def _pad(data, batch_sizes, steps):
    """A packed sequence's data [N, I] padded to [T, B, I] (T = steps, the rows in the packed
    order), and the lengths [B] (int64, CPU)."""
    return torch._pad_packed_sequence(data, batch_sizes, False, 0.0, steps)


def _pack(output, lengths_cpu):
    """The rows of output [T, B, P] that lie within their lengths, packed: [sum(lengths), P]."""
    return torch._pack_padded_sequence(output, lengths_cpu, False)[0]


def _check_packed_sequence(owner, packed):
    """A PackedSequence as pack_padded_sequence makes one: batch_sizes [T] int64 on the CPU,
    positive, non-increasing, summing to data's rows; sorted_indices and unsorted_indices
    (where given) inverse permutations of the batch. The engines index memory by these
    numbers, so a tampered sequence must stop here (PackedSequenceError). The checks run on
    Python lists: a few short tensors, where each tensor operation would cost more than the
    list (40 us a call in tensor operations, at every packed call)."""
    batch_sizes, data = packed.batch_sizes, packed.data
    what = f"{owner}: the PackedSequence's"
    if (not isinstance(batch_sizes, torch.Tensor) or batch_sizes.dim() != 1
            or batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu"):
        raise PackedSequenceError(f"{what} batch_sizes must be a 1-D int64 tensor on the CPU, "
                                  f"got {_describe(batch_sizes)}")
    if not isinstance(data, torch.Tensor) or data.dim() < 1:
        raise PackedSequenceError(f"{what} data must be a tensor of rows, got {_describe(data)}")
    sizes = batch_sizes.tolist()
    if not sizes:
        raise PackedSequenceError(f"{owner}: Expected sequence length to be larger than 0 in RNN "
                                  f"(the PackedSequence's batch_sizes is empty)")
    if min(sizes) <= 0:
        raise PackedSequenceError(f"{what} batch_sizes must be positive, got {sizes}")
    if any(later > earlier for earlier, later in zip(sizes, sizes[1:])):
        raise PackedSequenceError(f"{what} batch_sizes must not increase, got {sizes}")
    if sum(sizes) != data.size(0):
        raise PackedSequenceError(f"{what} batch_sizes sum to {sum(sizes)}, but its data has "
                                  f"{data.size(0)} rows")
    batch = sizes[0]
    permutations = {}
    for name in ("sorted_indices", "unsorted_indices"):
        indices = getattr(packed, name)
        if indices is None:
            continue
        order = (indices.tolist() if isinstance(indices, torch.Tensor) and indices.dim() == 1
                 and indices.dtype == torch.int64 else None)
        if order is None or sorted(order) != list(range(batch)):
            raise PackedSequenceError(f"{what} {name} must be a permutation of 0 .. {batch - 1} "
                                      f"(int64), got {_describe(indices)}")
        permutations[name] = order
    if len(permutations) == 2:
        sorted_order = permutations["sorted_indices"]
        if any(sorted_order[position] != row
               for row, position in enumerate(permutations["unsorted_indices"])):
            raise PackedSequenceError(f"{what} unsorted_indices must be the inverse of its "
                                      f"sorted_indices")


def _check_probability(name, argument, p):
    if isinstance(p, bool) or not isinstance(p, numbers.Number) or not 0 <= p < 1:
        raise ValueError(f"{name}: {argument} should be a number in range [0, 1) representing "
                         f"a probability, got {p!r}")


def _options_repr(options):
    """The cell options that differ from the defaults, as constructor arguments."""
    defaults = functional.CellOptions()
    return "".join(f", {field}={value!r}" for field, value in options._asdict().items()
                   if value != getattr(defaults, field))


def _describe(value):
    if isinstance(value, torch.Tensor):
        shown = value.tolist() if value.numel() <= 16 else f"shape {tuple(value.shape)}"
        return f"{shown} ({value.dtype}, {value.device})"
    return type(value).__name__


class LSTM(_RecurrentLayer, nn.RNNBase):
    """torch.nn.LSTM on rnnfast's fused engine.

    LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None, *, activation='tanh')

    `activation` (Keras' name) is applied to the cell candidate g and to the cell state in
    h = o * activation(c); 'tanh' is torch.nn's LSTM. forward(input, hx=None) returns
    (output, (h_n, c_n)).
    """

    _kind = "LSTM"

    def __init__(self, *args, activation="tanh", layer_norm=False, zoneout=0.0,
                 zoneout_cell=0.0, recurrent_dropout=0.0, input_dropout=0.0, **kwargs):
        if activation not in _LSTM_ACTIVATIONS:
            raise ValueError(f"LSTM: activation must be one of {_LSTM_ACTIVATIONS}, got "
                             f"{activation!r}")
        super().__init__("LSTM", *args, **kwargs)
        self.activation = activation
        self._init_options(layer_norm, zoneout, zoneout_cell, recurrent_dropout, input_dropout)

    @property
    def _cell(self):
        return "lstm" if self.activation == "tanh" else f"lstm_{self.activation}"

    # torch.nn.LSTM's versions of RNNBase's methods, for hx = (h_0, c_0): nn.LSTM.forward calls
    # them (under ONNX export it runs on this module).
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def forward(self, input, hx=None):
        if _onnx.exporting():
            return _onnx.layer_forward(self, nn.LSTM, input, hx)
        output, h_n, c_n = self._run(input, hx)
        return output, (h_n, c_n)

    def extra_repr(self):
        text = super().extra_repr()
        text += f", activation={self.activation!r}" if self.activation != "tanh" else ""
        return text + self._options_repr()


def _refuse_projection(kwargs):
    """torch.nn.GRU's and RNN's check, with their wording."""
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")


class GRU(_RecurrentLayer, nn.RNNBase):
    """torch.nn.GRU on rnnfast's fused engine.

    GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, device=None, dtype=None); forward(input, hx=None) returns
    (output, h_n).
    """

    _kind = "GRU"
    _cell = "gru"

    def __init__(self, *args, layer_norm=False, zoneout=0.0, recurrent_dropout=0.0,
                 input_dropout=0.0, **kwargs):
        _refuse_projection(kwargs)
        super().__init__("GRU", *args, **kwargs)
        self._init_options(layer_norm, zoneout, 0.0, recurrent_dropout, input_dropout)

    def forward(self, input, hx=None):
        if _onnx.exporting():
            return _onnx.layer_forward(self, nn.GRU, input, hx)
        output, h_n, _ = self._run(input, hx)
        return output, h_n

    def extra_repr(self):
        return super().extra_repr() + self._options_repr()


class RNN(_RecurrentLayer, nn.RNNBase):
    """torch.nn.RNN (Elman) on rnnfast's fused engine, with nonlinearity 'tanh', 'relu' or
    (beyond torch.nn) 'sigmoid'.

    RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None);
    forward(input, hx=None) returns (output, h_n).
    """

    _kind = "RNN"
    _rank_noun = " tensor"

    def __init__(self, *args, layer_norm=False, zoneout=0.0, recurrent_dropout=0.0,
                 input_dropout=0.0, **kwargs):
        _refuse_projection(kwargs)
        # torch.nn.RNN's reading of the arguments: nonlinearity is the fourth.
        if len(args) > 3:
            nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if nonlinearity not in _RNN_NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or "
                             "'relu'. (rnnfast also has 'sigmoid'.)")
        mode = f"RNN_{nonlinearity.upper()}"
        # The sigmoid cell has a tanh one's parameters; its mode is rnnfast's own.
        super().__init__("RNN_TANH" if nonlinearity == "sigmoid" else mode, *args, **kwargs)
        self.nonlinearity = nonlinearity
        self.mode = mode
        self._init_options(layer_norm, zoneout, 0.0, recurrent_dropout, input_dropout)

    @property
    def _cell(self):
        return "elman_" + self.mode[len("RNN_"):].lower()

    def forward(self, input, hx=None):
        if _onnx.exporting():
            return _onnx.layer_forward(self, nn.RNN, input, hx)
        output, h_n, _ = self._run(input, hx)
        return output, h_n

    def extra_repr(self):
        # torch.nn.RNN's repr omits the nonlinearity; rnnfast's own one is named.
        text = super().extra_repr()
        text += ", nonlinearity='sigmoid'" if self.mode == "RNN_SIGMOID" else ""
        return text + self._options_repr()


class _RecurrentCell:
    """What rnnfast's cells put in front of torch.nn.RNNCellBase: one step of a cell, the
    one-layer op run over a sequence of length 1, with torch.nn's checks."""

    __prepare_scriptable__ = _refuse_scripting

    # layer_norm and zoneout (functional.CellOptions; a cell has no sequence for the per-sequence
    # dropout masks), all off unless _init_options was given some.
    _options = functional.CellOptions()

    def _init_options(self, layer_norm=False, zoneout=0.0, zoneout_cell=0.0):
        """Checks the options and, with layer_norm, adds its parameters: layer_norm_ih_weight
        and layer_norm_hh_weight [G] (gains 1; bias_ih and bias_hh are the normalisations'
        biases), for LSTMCell also layer_norm_cell_weight and layer_norm_cell_bias [H]."""
        name = type(self).__name__
        if not isinstance(layer_norm, bool):
            raise TypeError(f"{name}: layer_norm must be a bool, got {_describe(layer_norm)}")
        for argument, p in (("zoneout", zoneout), ("zoneout_cell", zoneout_cell)):
            _check_probability(name, argument, p)
        options = functional.CellOptions(layer_norm, float(zoneout), float(zoneout_cell))
        if not options.any():
            return
        self._options = options
        if layer_norm:
            factory = {"dtype": self.weight_ih.dtype, "device": self.weight_ih.device}
            gates = self.weight_ih.shape[0]
            self.layer_norm_ih_weight = nn.Parameter(torch.ones(gates, **factory))
            self.layer_norm_hh_weight = nn.Parameter(torch.ones(gates, **factory))
            if isinstance(self, nn.LSTMCell):
                self.layer_norm_cell_weight = nn.Parameter(torch.ones(self.hidden_size, **factory))
                self.register_parameter(
                    "layer_norm_cell_bias",
                    nn.Parameter(torch.zeros(self.hidden_size, **factory)) if self.bias else None)

    def reset_parameters(self):
        super().reset_parameters()
        with torch.no_grad():
            for name in ("layer_norm_ih_weight", "layer_norm_hh_weight",
                         "layer_norm_cell_weight", "layer_norm_cell_bias"):
                parameter = getattr(self, name, None)
                if parameter is not None:
                    parameter.fill_(0.0 if name.endswith("bias") else 1.0)

    def _step_with_options(self, cell, x, h, c, w_ih):
        """One step with the cell options: x [B, I]; returns (h', c') [B, H]."""
        options = self._options
        zoneout_mask = zoneout_cell_mask = None
        if self.training:
            if options.zoneout:
                zoneout_mask = functional._zoneout_mask((1, x.size(0), self.hidden_size),
                                                        options.zoneout, x)
            if options.zoneout_cell:
                zoneout_cell_mask = functional._zoneout_mask((1, x.size(0), self.hidden_size),
                                                             options.zoneout_cell, x)
        _, h_new, c_new = functional.layer_with_options(
            cell, x.unsqueeze(0), h, c, w_ih, self.weight_hh, self.bias_ih, self.bias_hh, None,
            getattr(self, "layer_norm_ih_weight", None), getattr(self, "layer_norm_hh_weight", None),
            getattr(self, "layer_norm_cell_weight", None),
            getattr(self, "layer_norm_cell_bias", None), None, zoneout_mask, zoneout_cell_mask,
            options.zoneout, options.zoneout_cell)
        return h_new, c_new

    def _step(self, cell, input, h, c):
        """input [B, I] or [I]; h, c [B, H] / [H] or None. Returns (h', c' or None)."""
        options = self._options
        if (not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
                and not _onnx.exporting()):
            # The plain case in C++ (checks included), or NotImplemented for what needs the
            # rest of this function: its errors, unbatched input, computed weights. With cell
            # options likewise, where no zoneout masks are to be drawn (evaluation, or p = 0).
            if options is _RecurrentCell._options:
                result = _ops._C.single_step(cell, input, h, c, self._parameters,
                                             self.input_size, self.hidden_size)
            elif not options.draws_masks(self.training):
                result = _ops._C.options_step(cell, input, h, c, self._parameters,
                                              self.input_size, self.hidden_size,
                                              options.layer_norm, options.zoneout,
                                              options.zoneout_cell)
            else:
                result = NotImplemented
            if result is not NotImplemented:
                return result
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise NotATensorError(f"{name}: {_no_dim(input)} (input must be a Tensor, got "
                                  f"{type(input).__name__})")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D "
                             f"instead")
        is_lstm = cell.startswith("lstm")
        # (torch.nn's word for the state, its argument)
        arguments = ((("hx[0]", "hx[0]"), h), (("hx[1]", "hx[1]"), c)) if is_lstm \
            else ((("hidden", "hx"), h),)
        for (word, argument), state in arguments:
            if state is None:
                continue
            if not isinstance(state, torch.Tensor):
                raise NotATensorError(f"{name}: {_no_dim(state)} ({argument} must be a Tensor, "
                                      f"got {type(state).__name__})")
            if state.dim() not in (1, 2):
                raise ValueError(f"{name}: Expected {word} to be 1D or 2D, got {state.dim()}D "
                                 f"instead ({argument} of shape {_shape(state)})")
        if cell not in _ops.GATES:
            raise RuntimeError(f"{name}: Unknown nonlinearity: {self.nonlinearity} (rnnfast has "
                               f"{', '.join(_RNN_NONLINEARITIES)})")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        # torch.nn's checks (in ATen) and wording, on the batched forms.
        if x.size(1) != self.input_size:
            raise RuntimeError(f"{name}: input has inconsistent input_size: got {x.size(1)} "
                               f"expected {self.input_size}")
        # Read once: a parametrized weight (weight_norm) is computed at each read.
        w_ih = self.weight_ih
        _check_matches(name, "input", x, w_ih, "the module's parameters", multiplied=True)
        states = []
        for index, (argument, state) in enumerate((("hx", h), ("cx", c))):
            if state is None:
                states.append(None)
                continue
            s = state if batched else state.unsqueeze(0)
            expected = (x.size(0), self.hidden_size) if batched else (self.hidden_size,)
            detail = f" ({argument} must have shape {expected}, got {_shape(state)})"
            if s.size(0) != x.size(0):
                raise RuntimeError(f"{name}: Input batch size {x.size(0)} doesn't match "
                                   f"hidden{index} batch size {s.size(0)}" + detail)
            if s.size(1) != self.hidden_size or s.dim() != 2:
                raise RuntimeError(f"{name}: hidden{index} has inconsistent hidden_size: got "
                                   f"{s.size(1)}, expected {self.hidden_size}" + detail)
            # torch.nn multiplies h by W_hh; the LSTM's c it only adds (promoting its dtype).
            _check_matches(name, argument, s, x, "input", multiplied=argument == "hx")
            states.append(s)
        h, c = states
        if self.hidden_size == 0:
            # No units (torch.nn allows it): empty states, still part of the graph. The ops
            # refuse weights of no rows.
            empty = x.matmul(w_ih.t())
            h_new, c_new = empty, (empty.clone() if is_lstm else None)
        elif _onnx.exporting():
            _onnx.refuse_cell_options(self)
            h_new, c_new = _onnx.cell_step(cell, x, h, c, w_ih, self.weight_hh, self.bias_ih,
                                           self.bias_hh)
        elif self._options.any():
            h_new, c_new = self._step_with_options(cell, x, h, c, w_ih)
        else:
            _, h_new, c_new = functional.layer(
                cell, x.unsqueeze(0), h, c, w_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not batched:
            h_new = h_new.squeeze(0)
            c_new = c_new.squeeze(0) if is_lstm else c_new
        return h_new, (c_new if is_lstm else None)


class LSTMCell(_RecurrentCell, nn.LSTMCell):
    """torch.nn.LSTMCell on rnnfast's engine, with Keras' `activation` ('tanh' default).
    LSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None, *,
    activation='tanh', layer_norm=False, zoneout=0.0, zoneout_cell=0.0); forward(input, hx=None)
    with hx = (h, c) returns (h', c')."""

    def __init__(self, *args, activation="tanh", layer_norm=False, zoneout=0.0,
                 zoneout_cell=0.0, **kwargs):
        if activation not in _LSTM_ACTIVATIONS:
            raise ValueError(f"LSTMCell: activation must be one of {_LSTM_ACTIVATIONS}, got "
                             f"{activation!r}")
        super().__init__(*args, **kwargs)
        self.activation = activation
        self._init_options(layer_norm, zoneout, zoneout_cell)

    def forward(self, input, hx=None):
        h = c = None
        if hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise _lstm_cell_not_a_pair(hx)
            h, c = hx
        cell = "lstm" if self.activation == "tanh" else f"lstm_{self.activation}"
        return self._step(cell, input, h, c)

    def extra_repr(self):
        text = super().extra_repr()
        text += f", activation={self.activation!r}" if self.activation != "tanh" else ""
        return text + _options_repr(self._options)


class GRUCell(_RecurrentCell, nn.GRUCell):
    """torch.nn.GRUCell on rnnfast's engine. forward(input, hx=None) returns h'.
    GRUCell(input_size, hidden_size, bias=True, device=None, dtype=None, *, layer_norm=False,
    zoneout=0.0)."""

    def __init__(self, *args, layer_norm=False, zoneout=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_options(layer_norm, zoneout)

    def forward(self, input, hx=None):
        return self._step("gru", input, hx, None)[0]

    def extra_repr(self):
        return super().extra_repr() + _options_repr(self._options)


class RNNCell(_RecurrentCell, nn.RNNCell):
    """torch.nn.RNNCell on rnnfast's engine, nonlinearity 'tanh', 'relu' or (beyond
    torch.nn) 'sigmoid'. As torch.nn's, the nonlinearity is read at each call (an unknown
    one is an error of the call). forward(input, hx=None) returns h'.
    RNNCell(input_size, hidden_size, bias=True, nonlinearity='tanh', device=None, dtype=None,
    *, layer_norm=False, zoneout=0.0)."""

    def __init__(self, *args, layer_norm=False, zoneout=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_options(layer_norm, zoneout)

    def extra_repr(self):
        return super().extra_repr() + _options_repr(self._options)

    def forward(self, input, hx=None):
        return self._step(f"elman_{self.nonlinearity}", input, hx, None)[0]
