"""Drop-in replacements for torch.nn.LSTM, GRU, RNN and their cells.

Same constructor arguments and defaults, parameter names and shapes (state_dicts move both
ways), initialisation, forward signature and return shapes as torch.nn; the math runs in
rnnfast's fused ops. Beyond torch.nn, as Keras has them: RNN(nonlinearity='sigmoid') and
LSTM(activation='relu' | 'sigmoid') for the cell candidate and the cell state.
"""
import math
import numbers
import warnings

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from rnnfast import functional

_LSTM_ACTIVATIONS = ("tanh", "relu", "sigmoid")
_RNN_NONLINEARITIES = ("tanh", "relu", "sigmoid")


def _shape(t):
    return tuple(t.shape)


def _check_matches(owner, argument, tensor, reference, reference_name):
    """dtype and device of `tensor` must be those of `reference` (named reference_name)."""
    if tensor.dtype != reference.dtype:
        raise RuntimeError(f"{owner}: {argument} must have the dtype of {reference_name} "
                           f"({reference.dtype}), got {tensor.dtype}")
    if tensor.device != reference.device:
        raise RuntimeError(f"{owner}: {argument} must be on the device of {reference_name} "
                           f"({reference.device}), got {tensor.device}")


class _RecurrentBase(nn.Module):
    """What LSTM, GRU and RNN share: parameters, checks, and the translation of unbatched and
    packed input to the time-major form of rnnfast.functional (batch_first input goes to the
    ops as it is, except in a stack of bidirectional layers)."""

    _gates = 1

    def __init__(self, cell, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size <= 0:
            raise ValueError(f"{name}: input_size must be a positive integer, got {input_size!r}")
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size <= 0:
            raise ValueError(f"{name}: hidden_size must be a positive integer, got {hidden_size!r}")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"{name}: num_layers must be an integer >= 1, got {num_layers!r}")
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError(f"{name}: dropout must be a number in [0, 1] (the probability of "
                             f"zeroing an element between layers), got {dropout!r}")
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or proj_size < 0:
            raise ValueError(f"{name}: proj_size must be an integer >= 0, got {proj_size!r}")
        if proj_size >= hidden_size:
            raise ValueError(f"{name}: proj_size must be smaller than hidden_size = "
                             f"{hidden_size}, got {proj_size}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"{name}: dropout={dropout} has no effect with num_layers=1: dropout "
                          "applies between layers", stacklevel=3)
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        gate_size = self._gates * hidden_size
        state_size = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names = []
        # Per layer and direction (torch.nn's order: l0, l0_reverse, l1, ...), the parameter
        # names of (w_ih, w_hh, b_ih, b_hh, w_hr), None where the module has none.
        self._layer_weight_names = []
        for index in range(num_layers):
            for direction in range(directions):
                layer_input = input_size if index == 0 else state_size * directions
                suffix = f"_l{index}" + ("_reverse" if direction == 1 else "")
                shapes = {"weight_ih": (gate_size, layer_input),
                          "weight_hh": (gate_size, state_size)}
                if bias:
                    shapes.update(bias_ih=(gate_size,), bias_hh=(gate_size,))
                if proj_size > 0:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                for base, shape in shapes.items():
                    self.register_parameter(base + suffix,
                                            nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(base + suffix)
                self._layer_weight_names.append(tuple(
                    base + suffix if base in shapes else None
                    for base in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")))
        self.reset_parameters()

    def reset_parameters(self):
        """U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) for every parameter, as torch.nn."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self):
        """Kept for code written for torch.nn: rnnfast's engines read the parameters as they
        are, so there is nothing to flatten."""

    @property
    def all_weights(self):
        return [[w for w in layer if w is not None] for layer in self._weights()]

    def _weights(self):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) per layer and direction, None where absent."""
        # Straight from the parameter dict: Module.__getattr__ is slow at this call rate.
        parameters = self._parameters
        try:
            return [tuple(parameters[name] if name is not None else None for name in names)
                    for names in self._layer_weight_names]
        except KeyError:
            # A parametrization (weight_norm, spectral_norm) or pruning has replaced a parameter
            # with an attribute computed from others.
            return [tuple(getattr(self, name) if name is not None else None for name in names)
                    for names in self._layer_weight_names]

    def extra_repr(self):
        text = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            text += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if self.bias is not True:
            text += f", bias={self.bias}"
        if self.batch_first is not False:
            text += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            text += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            text += f", bidirectional={self.bidirectional}"
        return text

    # ---- forward ------------------------------------------------------------------------

    def _check_state(self, state, argument, expected, input):
        name = type(self).__name__
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{name}: {argument} must be a Tensor, got {type(state).__name__}")
        if _shape(state) != expected:
            layout = "num_layers * num_directions, " + ("batch, " if len(expected) == 3 else "")
            raise RuntimeError(f"{name}: {argument} must have shape {expected} ({layout}size), "
                               f"got {_shape(state)}")
        _check_matches(name, argument, state, input, "input")

    def _run(self, input, hx):
        """Shared forward: returns (output, h_n, c_n or None) in torch.nn's layout.

        hx is None, a Tensor (GRU / RNN) or a tuple (h_0, c_0) (LSTM); its shape follows the
        input: [L * D, B, P] for batched input, [L * D, P] for unbatched.
        """
        name = type(self).__name__
        is_lstm = self._gates == 4
        packed = isinstance(input, PackedSequence)
        directions = 2 if self.bidirectional else 1
        state_size = self.proj_size if self.proj_size > 0 else self.hidden_size
        weights = self._weights()
        weight = weights[0][0]  # weight_ih_l0
        lengths = None
        if packed:
            batch_sizes = input.batch_sizes
            steps = batch_sizes.size(0)
            # [T, B, I] in the packed (sorted by length) batch order, and lengths [B].
            sequence, lengths_cpu = torch._pad_packed_sequence(
                input.data, batch_sizes, False, 0.0, steps)
            batched = True
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"{name}: input must be a Tensor or a PackedSequence, got "
                                f"{type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: input must be 2-D (unbatched: T, input_size) or 3-D "
                                 f"(batched), got {input.dim()}-D input of shape {_shape(input)}")
            batched = input.dim() == 3
            sequence = input
            if not batched:
                sequence = sequence.unsqueeze(1)
        # The ops take a batch_first input [B, T, I] as it is and return a batch_first output. A
        # stack of bidirectional layers runs time-major: their concatenated outputs would be
        # copied time-major again for each next layer.
        batch_first_io = self.batch_first and batched and not packed
        batch_first = batch_first_io and not (self.bidirectional and self.num_layers > 1)
        if batch_first_io and not batch_first:
            sequence = sequence.transpose(0, 1)
        if sequence.size(-1) != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size = "
                               f"{self.input_size}, got {sequence.size(-1)}")
        _check_matches(name, "input", sequence, weight, "the module's parameters")
        batch = sequence.size(0 if batch_first else 1)

        h0 = c0 = None  # None: zero initial states, which the engines need not read
        if hx is not None:
            if is_lstm:
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    raise TypeError(f"{name}: hx must be a tuple (h_0, c_0), got "
                                    f"{type(hx).__name__}")
                h0, c0 = hx
            else:
                if not isinstance(hx, torch.Tensor):
                    raise TypeError(f"{name}: hx must be a Tensor, got {type(hx).__name__}")
                h0 = hx
            expected_dim = 3 if batched else 2
            for argument, state in (("h_0 (hx[0])" if is_lstm else "hx", h0),
                                    ("c_0 (hx[1])", c0)):
                if state is not None and isinstance(state, torch.Tensor) \
                        and state.dim() != expected_dim:
                    kind = "batched 3-D" if batched else "unbatched 2-D"
                    raise RuntimeError(f"{name}: for {kind} input, {argument} must be "
                                       f"{expected_dim}-D, got {state.dim()}-D of shape "
                                       f"{_shape(state)}")
            # Checked in the caller's own terms (unbatched states have no batch dim).
            batch_dims = (batch,) if batched else ()
            self._check_state(h0, "h_0 (hx[0])" if is_lstm else "hx",
                              (self.num_layers * directions, *batch_dims, state_size), sequence)
            if is_lstm:
                self._check_state(c0, "c_0 (hx[1])",
                                  (self.num_layers * directions, *batch_dims, self.hidden_size),
                                  sequence)
            if not batched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
            if packed and input.sorted_indices is not None:
                h0 = h0.index_select(1, input.sorted_indices)
                c0 = c0.index_select(1, input.sorted_indices) if c0 is not None else None

        if packed:
            lengths = lengths_cpu.to(sequence.device)
        output, h_n, c_n = functional.stacked(
            self.cell, sequence, h0, c0, weights, self.num_layers, self.bidirectional,
            self.dropout, self.training, lengths, batch_first)

        if packed:
            data, _ = torch._pack_padded_sequence(output, lengths_cpu, False)
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


class LSTM(_RecurrentBase):
    """torch.nn.LSTM on rnnfast's fused engine.

    LSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None, activation='tanh')

    `activation` (Keras' name) is applied to the cell candidate g and to the cell state in
    h = o * activation(c); 'tanh' is torch.nn's LSTM. forward(input, hx=None) returns
    (output, (h_n, c_n)).
    """

    _gates = 4

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None,
                 activation="tanh"):
        if activation not in _LSTM_ACTIVATIONS:
            raise ValueError(f"LSTM: activation must be one of {_LSTM_ACTIVATIONS}, got "
                             f"{activation!r}")
        cell = "lstm" if activation == "tanh" else f"lstm_{activation}"
        super().__init__(cell, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device, dtype)
        self.activation = activation

    def forward(self, input, hx=None):
        output, h_n, c_n = self._run(input, hx)
        return output, (h_n, c_n)

    def extra_repr(self):
        text = super().extra_repr()
        return text + (f", activation={self.activation!r}" if self.activation != "tanh" else "")


class GRU(_RecurrentBase):
    """torch.nn.GRU on rnnfast's fused engine.

    GRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, device=None, dtype=None); forward(input, hx=None) returns
    (output, h_n).
    """

    _gates = 3

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        super().__init__("gru", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)

    def forward(self, input, hx=None):
        output, h_n, _ = self._run(input, hx)
        return output, h_n


class RNN(_RecurrentBase):
    """torch.nn.RNN (Elman) on rnnfast's fused engine, with nonlinearity 'tanh', 'relu' or
    (beyond torch.nn) 'sigmoid'.

    RNN(input_size, hidden_size, num_layers=1, nonlinearity='tanh', bias=True,
    batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None);
    forward(input, hx=None) returns (output, h_n).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None):
        if nonlinearity not in _RNN_NONLINEARITIES:
            raise ValueError(f"RNN: nonlinearity must be one of {_RNN_NONLINEARITIES}, got "
                             f"{nonlinearity!r}")
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, 0, device, dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input, hx=None):
        output, h_n, _ = self._run(input, hx)
        return output, h_n

    def extra_repr(self):
        text = super().extra_repr()
        return text + (f", nonlinearity={self.nonlinearity!r}"
                       if self.nonlinearity != "tanh" else "")


class _CellBase(nn.Module):
    """One step of a cell: the one-layer op run over a sequence of length 1."""

    _gates = 1

    def __init__(self, cell, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size <= 0:
            raise ValueError(f"{name}: input_size must be a positive integer, got {input_size!r}")
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size <= 0:
            raise ValueError(f"{name}: hidden_size must be a positive integer, got {hidden_size!r}")
        self.cell = cell
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        gate_size = self._gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gate_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gate_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gate_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gate_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self):
        """U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)) for every parameter, as torch.nn."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self):
        text = f"{self.input_size}, {self.hidden_size}"
        return text + (f", bias={self.bias}" if self.bias is not True else "")

    def _check(self, input, state, argument, batched):
        name = type(self).__name__
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"{name}: {argument} must be a Tensor, got {type(state).__name__}")
        expected = (input.size(0), self.hidden_size) if batched else (self.hidden_size,)
        if _shape(state) != expected:
            raise RuntimeError(f"{name}: {argument} must have shape {expected} (batch, "
                               f"hidden_size), got {_shape(state)}")
        _check_matches(name, argument, state, input, "input")

    def _step(self, input, h, c):
        """input [B, I] or [I]; h, c [B, H] / [H] or None. Returns (h', c' or None)."""
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: input must be 1-D (unbatched: input_size) or 2-D "
                             f"(batch, input_size), got {input.dim()}-D input of shape "
                             f"{_shape(input)}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(f"{name}: input.size(-1) must be equal to input_size = "
                               f"{self.input_size}, got {input.size(-1)}")
        # Read once: a parametrized weight (weight_norm) is computed at each read.
        w_ih = self.weight_ih
        _check_matches(name, "input", input, w_ih, "the module's parameters")
        batched = input.dim() == 2
        is_lstm = self._gates == 4
        for argument, state in (("hx", h), ("cx", c)):
            if state is not None:
                self._check(input, state, argument, batched)
        x = input if batched else input.unsqueeze(0)
        # No state given: None for both (zero initial states).
        if h is not None and not batched:
            h = h.unsqueeze(0)
        if c is not None and not batched:
            c = c.unsqueeze(0)
        output, h_new, c_new = functional.layer(
            self.cell, x.unsqueeze(0), h, c, w_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not batched:
            h_new = h_new.squeeze(0)
            c_new = c_new.squeeze(0) if is_lstm else c_new
        return h_new, (c_new if is_lstm else None)


class LSTMCell(_CellBase):
    """torch.nn.LSTMCell on rnnfast's engine, with Keras' `activation` ('tanh' default).
    forward(input, hx=None) with hx = (h, c) returns (h', c')."""

    _gates = 4

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None,
                 activation="tanh"):
        if activation not in _LSTM_ACTIVATIONS:
            raise ValueError(f"LSTMCell: activation must be one of {_LSTM_ACTIVATIONS}, got "
                             f"{activation!r}")
        cell = "lstm" if activation == "tanh" else f"lstm_{activation}"
        super().__init__(cell, input_size, hidden_size, bias, device, dtype)
        self.activation = activation

    def forward(self, input, hx=None):
        h = c = None
        if hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"LSTMCell: hx must be a tuple (h, c), got {type(hx).__name__}")
            h, c = hx
        return self._step(input, h, c)


class GRUCell(_CellBase):
    """torch.nn.GRUCell on rnnfast's engine. forward(input, hx=None) returns h'."""

    _gates = 3

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__("gru", input_size, hidden_size, bias, device, dtype)

    def forward(self, input, hx=None):
        return self._step(input, hx, None)[0]


class RNNCell(_CellBase):
    """torch.nn.RNNCell on rnnfast's engine, nonlinearity 'tanh', 'relu' or 'sigmoid'.
    forward(input, hx=None) returns h'."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None,
                 dtype=None):
        if nonlinearity not in _RNN_NONLINEARITIES:
            raise ValueError(f"RNNCell: nonlinearity must be one of {_RNN_NONLINEARITIES}, got "
                             f"{nonlinearity!r}")
        super().__init__(f"rnn_{nonlinearity}", input_size, hidden_size, bias, device, dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input, hx=None):
        return self._step(input, hx, None)[0]
