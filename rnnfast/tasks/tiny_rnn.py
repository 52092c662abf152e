"""tiny-rnn: three steps of a scalar RNN, computed with rnnfast's Elman layer.

The network of the exercise has one input x, one sigmoid hidden unit h whose bias
is added *after* the activation, and one linear output y::

    h_t = sigmoid(w_i x_t + w_h h_{t-1}) + h_bias,   h_{-1} = 0
    y_t = w_o h_t + y_bias

A standard Elman cell puts its bias inside the activation.  With the change of
variable h' = h - h_bias the recurrence becomes

    h'_t = sigmoid(w_i x_t + w_h h'_{t-1} + w_h h_bias),   h'_{-1} = -h_bias
    y_t  = w_o h'_t + (w_o h_bias + y_bias)

which is exactly ``rnnfast.RNN(1, 1, nonlinearity='sigmoid')`` with weight_ih = w_i,
weight_hh = w_h, bias = w_h * h_bias, initial state -h_bias, followed by a
``Linear(1, 1)`` with weight w_o and bias w_o * h_bias + y_bias.
"""

import math

import torch
from torch import nn

import rnnfast

from .common import Metric, Result

TITLE = "3 steps of a scalar sigmoid RNN"
SOURCE = "002 ex. 1"
DEFAULT_SEED = 0

X = [9.0, 4.0, -2.0]
W_I, W_H, W_O = 0.5, -1.0, -0.7
H_BIAS, Y_BIAS = -1.0, 0.0
REFERENCE = {"h_2": -0.7072252802268861, "y_2": 0.4950576961588203}


def by_hand():
    """The exercise's own forward pass in plain Python (for the plot and a cross-check)."""
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))
    h, hs = 0.0, []
    for x in X:
        h = sig(W_I * x + W_H * h) + H_BIAS
        hs.append(h)
    return hs, [W_O * h + Y_BIAS for h in hs]


class TinyRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = rnnfast.RNN(1, 1, nonlinearity="sigmoid", batch_first=True)
        self.out = nn.Linear(1, 1)

    def set_weights(self):
        """Call after moving the module to its device and dtype (so that -0.7 is
        not first rounded to float32)."""
        with torch.no_grad():
            self.rnn.weight_ih_l0.fill_(W_I)
            self.rnn.weight_hh_l0.fill_(W_H)
            self.rnn.bias_ih_l0.fill_(W_H * H_BIAS)
            self.rnn.bias_hh_l0.zero_()
            self.out.weight.fill_(W_O)
            self.out.bias.fill_(W_O * H_BIAS + Y_BIAS)
        return self

    def forward(self, x):
        h0 = torch.full((1, x.shape[0], 1), -H_BIAS, dtype=x.dtype, device=x.device)
        hp, _ = self.rnn(x, h0)            # h' = h - h_bias at every step
        return hp + H_BIAS, self.out(hp)   # h, y


def compute(device, dtype=torch.float64):
    """(h, y) over the three steps, each a list of floats."""
    model = TinyRNN().to(device=device, dtype=dtype).set_weights()
    x = torch.tensor(X, dtype=dtype, device=device).view(1, 3, 1)
    with torch.no_grad():
        h, y = model(x)
    return h.view(-1).cpu().tolist(), y.view(-1).cpu().tolist()


def run(ctx):
    try:
        h, y = compute(ctx.device, torch.float64)
        dtype = "float64"
    except (RuntimeError, TypeError, NotImplementedError):  # a build without float64 kernels
        h, y = compute(ctx.device, torch.float32)
        dtype = "float32"
    print(f"h_2 = {h[2]:.6f}")
    print(f"y_2 = {y[2]:.6f}")

    hand_h, hand_y = by_hand()
    fig, ax = ctx.figure()
    t = range(len(X))
    ax.plot(t, hand_h, "o-", lw=3, alpha=0.4, label="h by hand")
    ax.plot(t, h, "x--", label="h (rnnfast.RNN, sigmoid)")
    ax.plot(t, hand_y, "o-", lw=3, alpha=0.4, label="y by hand")
    ax.plot(t, y, "x--", label="y (rnnfast.RNN + Linear)")
    ax.set_xticks(list(t))
    ax.set_xlabel("time step t")
    ax.set_title("tiny RNN, x = [9, 4, -2]")
    ax.legend()
    ctx.savefig(fig, "tiny_rnn")

    metrics = [Metric("RNN(sigmoid)", "h_2", h[2], REFERENCE["h_2"], fmt=".6f"),
               Metric("RNN(sigmoid)", "y_2", y[2], REFERENCE["y_2"], fmt=".6f")]
    return Result(
        models=["rnnfast.RNN(1, 1, nonlinearity='sigmoid') + Linear(1, 1)"],
        metrics=metrics,
        summary=f"h_2 = {h[2]:.6f}, y_2 = {y[2]:.6f} (reference {REFERENCE['h_2']:.6f}, "
                f"{REFERENCE['y_2']:.6f})",
        reference="h_2 = -0.7072252802268861, y_2 = 0.4950576961588203",
        details={"dtype": dtype, "h": h, "y": y, "h_by_hand": hand_h, "y_by_hand": hand_y,
                 "max_abs_error": max(abs(a - b) for a, b in zip(h + y, hand_h + hand_y))},
        epochs=0,
    )
