"""torch.onnx.export of rnnfast's layers and cells.

ONNX has no form of rnnfast's fused op (rnnfast::forward): both exporters stop at it. While
torch.onnx.export traces a model, rnnfast's modules therefore compute with torch.nn's own
forward on the same parameters, so the exporter meets the ops it knows from torch.nn
(aten::lstm, aten::gru, aten::rnn_tanh / rnn_relu, the cell ops) and writes what it writes for
torch.nn's layers: the ONNX LSTM and GRU operators (and RNN with dynamo=False; the default
exporter writes torch.nn's Elman layers as plain operators, time step by time step), and plain
operators for the cells. Options torch.nn and ONNX have no form of are refused, naming them.
"""
import torch
import torch.nn.functional as F

# Called at every forward call, so bound once (the attribute lookups would cost as much as the
# calls): about 40 and 65 ns.
_is_exporting = torch.compiler.is_exporting
_tracing_state = torch._C._get_tracing_state


def exporting():
    """Whether torch.onnx.export is tracing this call.

    The default exporter (dynamo=True) traces with torch.export, under which
    torch.compiler.is_exporting() holds: first without Dynamo (strict=False), then, if that
    fails, with it (strict=True). Dynamo reads torch.onnx.is_in_onnx_export() as False, so the
    exporter's own flag, which that function returns, is read here; in a plain torch.export it
    is False and the call keeps rnnfast's op. The TorchScript exporter (dynamo=False) traces
    with torch.jit.trace, which leaves a tracing state. Under torch.compile both checks are
    constants to Dynamo (no guard, no graph break). torch.onnx.is_in_onnx_export() itself
    costs about 1.6 us, a fifth of a small layer's call: it is asked only while tracing.
    """
    if _is_exporting():
        # Imported at the first exported call, not with rnnfast (torch.onnx takes 55 ms to
        # import); Dynamo traces the import of a loaded module as a constant.
        from torch.onnx._internal.exporter import _flags
        return _flags._is_onnx_exporting
    return _tracing_state() is not None and torch.onnx.is_in_onnx_export()


def _refuse(module, option, why):
    raise torch.onnx.OnnxExporterError(
        f"torch.onnx.export: rnnfast.{type(module).__name__} with {option} cannot be exported to "
        f"ONNX: {why}")


def refuse_cell_options(module):
    """Layers and cells with layer_norm, zoneout or dropout masks: ONNX's recurrent operators
    have none of them."""
    options = module._options
    if options.any():
        given = ", ".join(f"{name}={value!r}" for name, value in options._asdict().items()
                          if value)
        _refuse(module, given, "ONNX's LSTM, GRU and RNN operators, which torch.nn's layers "
                "export to, have no layer normalisation, zoneout or dropout")


def layer_forward(module, torch_class, input, hx):
    """module's forward as torch_class (nn.LSTM, nn.GRU or nn.RNN) computes it, on the module's
    parameters. rnnfast's layers have torch_class's attributes (RNNBase's constructor builds
    both; rnnfast.convert swaps the classes) and the methods its forward calls (rnnfast.LSTM
    takes nn.LSTM's), so torch.nn's forward runs on the module as it is."""
    refuse_cell_options(module)
    if getattr(module, "activation", "tanh") != "tanh":
        _refuse(module, f"activation={module.activation!r}",
                "ONNX's LSTM operator is reached through torch.nn's LSTM, whose cell candidate "
                "and cell state activation is tanh (the cells, LSTMCell, export with any)")
    if module.mode == "RNN_SIGMOID":
        _refuse(module, "nonlinearity='sigmoid'",
                "torch.nn's RNN, through which ONNX's RNN operator is reached, has tanh and "
                "relu (the cells, RNNCell, export with sigmoid)")
    if module.proj_size > 0:
        _refuse(module, f"proj_size={module.proj_size}",
                "ONNX's LSTM operator has no projection, and torch.onnx exports none of "
                "torch.nn.LSTM's either (dynamo=False refuses it; dynamo=True writes a model "
                "that onnxruntime rejects)")
    return torch_class.forward(module, input, hx)


def cell_step(cell, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step of `cell` (a name of rnnfast._ops.GATES) on batched tensors, x [B, I], h [B, H]
    and c [B, H] or None for zeros, as torch.nn's cells compute it (their ops, which the
    exporters write as plain ONNX operators); the activations torch.nn lacks from the same
    plain operators. Returns (h' [B, H], c' [B, H] or None)."""
    zeros = torch.zeros(x.size(0), w_hh.size(1), dtype=x.dtype, device=x.device)
    h = zeros if h is None else h
    if cell == "gru":
        return torch.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh), None
    if cell == "elman_tanh":
        return torch.rnn_tanh_cell(x, h, w_ih, w_hh, b_ih, b_hh), None
    if cell == "elman_relu":
        return torch.rnn_relu_cell(x, h, w_ih, w_hh, b_ih, b_hh), None
    if cell == "elman_sigmoid":
        return torch.sigmoid(F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)), None
    c = zeros if c is None else c
    if cell == "lstm":
        return torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
    # lstm_relu, lstm_sigmoid: the activation on the cell candidate g and on the cell state.
    activation = torch.relu if cell == "lstm_relu" else torch.sigmoid
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)  # [B, 4H], torch.nn's order
    input_gate, forget_gate, candidate, output_gate = gates.chunk(4, 1)
    c_new = torch.sigmoid(forget_gate) * c + torch.sigmoid(input_gate) * activation(candidate)
    return torch.sigmoid(output_gate) * activation(c_new), c_new
