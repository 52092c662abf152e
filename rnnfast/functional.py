"""Multi-layer, bidirectional recurrent networks on top of rnnfast's one-layer ops.

Everything here works on time-major tensors, input [T, B, I], or with batch_first=True on
[B, T, I] (the ops take that layout as it is). The modules (rnnfast/modules.py) translate
unbatched and packed inputs to the time-major form.
"""
import torch
import torch.nn.functional as F
from torch._C._functorch import TransformType, get_interpreter_stack
from torch.autograd.function import once_differentiable

from rnnfast import _ops  # noqa: F401  (loads the extension and registers the ops)


# The op's overload itself: calling it skips the overload resolution of torch.ops.rnnfast.forward.
_FORWARD = torch.ops.rnnfast.forward.default
# The forward as ATen ops, differentiable to any order (csrc/differentiable_layer.cpp).
_DIFFERENTIABLE_FORWARD = torch.ops.rnnfast.differentiable_forward.default


def layer(cell, input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, lengths=None,
          reverse=False, batch_first=False):
    """One layer in one direction.

    input [T, B, I]; hx [B, P] and cx [B, H] (LSTM cells), or both None for zero initial
    states (which lets the engine skip work on them); w_ih [G, I]; w_hh [G, P];
    b_ih, b_hh [G] or None; w_hr [P, H] (LSTM projection) or None; lengths [B] int64 on the
    input's device or None (row b runs steps 0 .. lengths[b] - 1; later outputs are zero).
    Returns output [T, B, P], h_n [B, P] and c_n [B, H] (an empty tensor for non-LSTM cells).
    batch_first=True: input [B, T, I] and output [B, T, P].
    """
    if torch._C._are_functorch_transforms_active():
        # torch.func's transforms refuse the C++ graph node of eager calls. One reverse-mode
        # transform (grad, vjp, jacrev) takes the fused ops as an autograd.Function; nested
        # ones and forward mode (jvp, jacfwd, hessian) the ATen composition they differentiate.
        transforms = [interpreter.key() for interpreter in get_interpreter_stack()]
        if TransformType.Jvp in transforms or transforms.count(TransformType.Grad) > 1:
            return _DIFFERENTIABLE_FORWARD(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr,
                                           lengths, reverse, batch_first)
        output, h_n, c_n, _ = _LayerFunction.apply(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh,
                                                   w_hr, lengths, reverse, batch_first)
        return output, h_n, c_n
    if not torch.compiler.is_compiling():
        # Eager: the op called from C++ (see csrc/python_module.cpp), which also decides whether
        # to save the workspace for a backward.
        result = _ops._C.layer(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                               reverse, batch_first)
        if result is not NotImplemented:
            return result
    # Traced by torch.compile, or arguments only torch.ops handles (and refuses where they are
    # no tensors: its error names the argument).
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad
        for t in (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr))
    output, h_n, c_n, _ = _FORWARD(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                   reverse, needs_grad, batch_first)
    return output, h_n, c_n


class _LayerFunction(torch.autograd.Function):
    """rnnfast::forward and rnnfast::backward as a Python autograd.Function, the form torch.func's
    transforms (grad, vjp, jacrev, vmap) take: they refuse the C++ graph node of eager calls.
    Under vmap each op runs once per vmapped slice (functorch's loop over ops without a batching
    rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                batch_first):
        return _FORWARD(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, True,
                        batch_first)

    @staticmethod
    def setup_context(ctx, inputs, outputs):
        cell, input, hx, cx, w_ih, w_hh, b_ih, _, w_hr, lengths, reverse, batch_first = inputs
        output, _, _, workspace = outputs
        ctx.mark_non_differentiable(workspace)
        ctx.save_for_backward(input, hx, cx, w_ih, w_hh, w_hr, lengths, output, workspace)
        ctx.cell, ctx.reverse, ctx.batch_first = cell, reverse, batch_first
        ctx.has_bias = b_ih is not None

    @staticmethod
    @once_differentiable  # the backward op has no derivative: differentiating its results raises
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _):
        input, hx, cx, w_ih, w_hh, w_hr, lengths, output, workspace = ctx.saved_tensors
        # Undefined gradients come as zeros (the Function materialises them); c_n of the other
        # cells is an empty tensor with no gradient of its own.
        grad_c_n = grad_c_n if _ops.CELLS[ctx.cell]["has_cell_state"] else None
        grads = torch.ops.rnnfast.backward(
            ctx.cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, ctx.has_bias,
            w_hr, lengths, ctx.reverse, output, workspace, ctx.needs_input_grad[1],
            ctx.batch_first)
        g_input, g_hx, g_cx, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr = grads
        return (None, g_input if ctx.needs_input_grad[1] else None,
                g_hx if hx is not None else None, g_cx if cx is not None else None,
                g_w_ih, g_w_hh, g_b_ih if ctx.has_bias else None,
                g_b_hh if ctx.has_bias else None, g_w_hr if w_hr is not None else None,
                None, None, None)


def stacked(cell, input, hx, cx, weights, num_layers, bidirectional, dropout=0.0,
            training=False, lengths=None, batch_first=False):
    """num_layers layers of `cell`, each in one or two directions, dropout between layers.

    input [T, B, I]; hx [L * D, B, P] and cx [L * D, B, H] (LSTM), or None for zero states;
    weights: for each layer and direction (in torch.nn's order: l0, l0_reverse, l1, ...) a
    tuple (w_ih, w_hh, b_ih, b_hh, w_hr) with None for absent tensors.
    Returns output [T, B, D * P], h_n [L * D, B, P], c_n [L * D, B, H] or None.
    batch_first=True: input [B, T, I] and output [B, T, D * P].
    lengths: as in layer; the input is then a padded packed sequence (time-major, rows sorted
    by decreasing length), and the dropout masks are drawn on its packed form.
    """
    has_cell_state = _ops.CELLS[cell]["has_cell_state"]
    if num_layers == 1 and not bidirectional:
        # One layer in one direction (most models): no lists, and views of h_n and c_n.
        w_ih, w_hh, b_ih, b_hh, w_hr = weights[0]
        output, h, c = layer(cell, input, hx[0] if hx is not None else None,
                             cx[0] if cx is not None else None, w_ih, w_hh, b_ih, b_hh, w_hr,
                             lengths, batch_first=batch_first)
        return output, h.unsqueeze(0), (c.unsqueeze(0) if has_cell_state else None)
    directions = 2 if bidirectional else 1
    h_n, c_n = [], []
    x = input
    for index in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = index * directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            out, h, c = layer(cell, x, hx[k] if hx is not None else None,
                              cx[k] if cx is not None else None, w_ih, w_hh, b_ih, b_hh, w_hr,
                              lengths, reverse=direction == 1, batch_first=batch_first)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
        if dropout > 0 and training and index < num_layers - 1:
            x = _dropout_between_layers(x, dropout, lengths)
    return x, torch.stack(h_n), (torch.stack(c_n) if has_cell_state else None)


def _dropout_between_layers(x, p, lengths):
    """Dropout of a layer's output as torch.nn draws it: on the [T, B, D * P] tensor, or, for a
    packed sequence (lengths given), on its packed data [sum(lengths), D * P], so that a seeded
    run consumes torch's generator as torch.nn's does."""
    if lengths is None:
        return F.dropout(x, p=p, training=True)
    if torch.compiler.is_compiling():
        return _packed_dropout_outside_graph(x, p, lengths)
    return _packed_dropout(x, p, lengths)


def _packed_dropout(x, p, lengths):
    lengths_cpu = lengths.cpu()
    data, batch_sizes = torch._pack_padded_sequence(x, lengths_cpu, False)
    data = F.dropout(data, p=p, training=True)
    padded, _ = torch._pad_packed_sequence(data, batch_sizes, False, 0.0, x.size(0))
    return padded


# Under torch.compile: outside the graph (a graph break), since the packed data's shape is the
# sum of the lengths' values, which tracing cannot know.
_packed_dropout_outside_graph = torch.compiler.disable(_packed_dropout)
