"""Plain PyTorch reference implementations of the recurrent cells and layers.

Everything here is written for clarity, not speed: one explicit time loop,
one small function per cell, torch's gate orders and parameter names.  The
modules are ``nn.Module`` subclasses whose parameters have exactly the names
and shapes of ``torch.nn.LSTM/GRU/RNN`` and the cells, so a ``state_dict`` can
be moved between them and torch.nn / rnnfast modules with ``strict=True``.

They exist to check the variants torch.nn does not have (Elman with a
``'sigmoid'`` nonlinearity, LSTM with ``activation='relu'``).  The test-suite
checks these references against torch.nn for the standard activations, so they
can be trusted for the others.

Gate orders (as in torch.nn):
  LSTM: i, f, g, o        c' = f*c + i*act(g)      h' = o*act(c')  [@ W_hr^T]
  GRU:  r, z, n           n = tanh(W_in x + b_in + r*(W_hn h + b_hn))
                          h' = (1-z)*n + z*h
  Elman:                  h' = act(W_ih x + b_ih + W_hh h + b_hh)
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
}

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


# --------------------------------------------------------------------------
# One function per cell: a single time step for a batch (B, ...) of inputs.
# --------------------------------------------------------------------------

def _linear(x, w, b):
    y = x @ w.t()
    if b is not None:
        y = y + b
    return y


def lstm_step(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr=None, activation="tanh"):
    act = ACTIVATIONS[activation]
    gates = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    i = torch.sigmoid(i)
    f = torch.sigmoid(f)
    g = act(g)
    o = torch.sigmoid(o)
    c_new = f * c + i * g
    h_new = o * act(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new


def gru_step(x, h, w_ih, w_hh, b_ih, b_hh):
    gi = _linear(x, w_ih, b_ih)
    gh = _linear(h, w_hh, b_hh)
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


def rnn_step(x, h, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh"):
    return ACTIVATIONS[nonlinearity](_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh))


# --------------------------------------------------------------------------
# Multi-layer, (bi)directional layer, the torch.nn.LSTM/GRU/RNN interface.
# --------------------------------------------------------------------------

class ReferenceRNN(nn.Module):
    """mode in {'LSTM', 'GRU', 'RNN'}; ``act`` is the LSTM activation or the
    Elman nonlinearity (ignored for GRU)."""

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False,
                 proj_size=0, act="tanh", device=None, dtype=None):
        super().__init__()
        assert mode in GATES
        assert proj_size == 0 or mode == "LSTM"
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.act = act
        ndir = 2 if bidirectional else 1
        gate_size = GATES[mode] * hidden_size
        real_hidden = proj_size if proj_size > 0 else hidden_size
        fk = dict(device=device, dtype=dtype)
        for layer in range(num_layers):
            for d in range(ndir):
                sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
                layer_in = input_size if layer == 0 else real_hidden * ndir
                self.register_parameter("weight_ih" + sfx, nn.Parameter(torch.empty(gate_size, layer_in, **fk)))
                self.register_parameter("weight_hh" + sfx, nn.Parameter(torch.empty(gate_size, real_hidden, **fk)))
                if bias:
                    self.register_parameter("bias_ih" + sfx, nn.Parameter(torch.empty(gate_size, **fk)))
                    self.register_parameter("bias_hh" + sfx, nn.Parameter(torch.empty(gate_size, **fk)))
                if proj_size > 0:
                    self.register_parameter("weight_hr" + sfx, nn.Parameter(torch.empty(proj_size, hidden_size, **fk)))
        k = 1.0 / math.sqrt(hidden_size)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-k, k)

    def _params(self, layer, d):
        sfx = f"_l{layer}" + ("_reverse" if d == 1 else "")
        get = lambda name: getattr(self, name + sfx, None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")

    def _run_direction(self, x, h, c, lengths, layer, d):
        """x: (T, B, I); h, c: (B, *); lengths: (B,) int tensor or None.
        Sequence b only sees steps t < lengths[b]; the reverse direction starts
        at its own last valid step.  Padded outputs are zero."""
        w_ih, w_hh, b_ih, b_hh, w_hr = self._params(layer, d)
        T = x.shape[0]
        outs = [None] * T
        steps = range(T - 1, -1, -1) if d == 1 else range(T)
        for t in steps:
            if self.mode == "LSTM":
                h_new, c_new = lstm_step(x[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr, self.act)
            elif self.mode == "GRU":
                h_new, c_new = gru_step(x[t], h, w_ih, w_hh, b_ih, b_hh), None
            else:
                h_new, c_new = rnn_step(x[t], h, w_ih, w_hh, b_ih, b_hh, self.act), None
            if lengths is None:
                h, c = h_new, c_new
                outs[t] = h_new
            else:
                valid = (t < lengths).unsqueeze(1)
                h = torch.where(valid, h_new, h)
                if c is not None:
                    c = torch.where(valid, c_new, c)
                outs[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
        return torch.stack(outs, 0), h, c

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        unbatched = False
        lengths = None
        if packed:
            x, lengths = pad_packed_sequence(input, batch_first=False)
        elif input.dim() == 2:
            unbatched = True
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        ndir = 2 if self.bidirectional else 1
        B = x.shape[1]
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        if hx is None:
            h0 = x.new_zeros(self.num_layers * ndir, B, real_hidden)
            c0 = x.new_zeros(self.num_layers * ndir, B, self.hidden_size)
        else:
            h0, c0 = hx if self.mode == "LSTM" else (hx, None)
            if unbatched:
                h0 = h0.unsqueeze(1)
                c0 = c0.unsqueeze(1) if c0 is not None else None
        if self.mode != "LSTM":
            c0 = None

        layer_input = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(ndir):
                idx = layer * ndir + d
                out, h, c = self._run_direction(
                    layer_input, h0[idx], None if c0 is None else c0[idx], lengths, layer, d)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(outs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input
        h_n = torch.stack(h_n, 0)
        c_n = torch.stack(c_n, 0) if self.mode == "LSTM" else None

        if packed:
            output = pack_padded_sequence(output, lengths, enforce_sorted=False)
        elif unbatched:
            output = output.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            output = output.transpose(0, 1)
        if self.mode == "LSTM":
            return output, (h_n, c_n)
        return output, h_n


class ReferenceCell(nn.Module):
    """The torch.nn.LSTMCell/GRUCell/RNNCell interface; mode as above."""

    def __init__(self, mode, input_size, hidden_size, bias=True, act="tanh",
                 device=None, dtype=None):
        super().__init__()
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.act = act
        fk = dict(device=device, dtype=dtype)
        gate_size = GATES[mode] * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gate_size, input_size, **fk))
        self.weight_hh = nn.Parameter(torch.empty(gate_size, hidden_size, **fk))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gate_size, **fk))
            self.bias_hh = nn.Parameter(torch.empty(gate_size, **fk))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        k = 1.0 / math.sqrt(hidden_size)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-k, k)

    def forward(self, input, hx=None):
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        zeros = x.new_zeros(x.shape[0], self.hidden_size)
        if self.mode == "LSTM":
            if hx is None:
                h, c = zeros, zeros
            else:
                h, c = (hx[0].unsqueeze(0), hx[1].unsqueeze(0)) if unbatched else hx
            h, c = lstm_step(x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                             None, self.act)
            return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)
        h = zeros if hx is None else (hx.unsqueeze(0) if unbatched else hx)
        if self.mode == "GRU":
            h = gru_step(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        else:
            h = rnn_step(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh, self.act)
        return h.squeeze(0) if unbatched else h
