"""The layer with cell options (layer normalisation, zoneout, recurrent dropout) as ops:
rnnfast::forward_with_options and rnnfast::backward_with_options (csrc/layer_options.h), their
fake implementations for torch.compile, and the forward's autograd formula as the
autograd.Function that torch.func's transforms take (the ops' own autograd, which eager calls
and torch.compile use, is a C++ graph node: csrc/options_autograd.cpp)."""
import torch
from torch.autograd.function import once_differentiable

from rnnfast import _ops

_FORWARD = torch.ops.rnnfast.forward_with_options.default
_BACKWARD = torch.ops.rnnfast.backward_with_options.default


def _has_cell_state(cell):
    return _ops.CELLS[cell]["has_cell_state"]


@torch.library.register_fake("rnnfast::forward_with_options")
def _forward_fake(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, norm_ih_weight,
                  norm_hh_weight, norm_cell_weight, norm_cell_bias, recurrent_mask, zoneout_mask,
                  zoneout_cell_mask, zoneout, zoneout_cell, lengths, reverse, save):
    steps, batch, _ = input.shape
    gates = w_ih.shape[0]
    hidden = gates // _ops.GATES[cell]
    state = w_hh.shape[1]
    lstm = _has_cell_state(cell)
    saved_per_unit = _ops.CELLS[cell]["saved_per_unit"]

    def saved(wanted, width):
        return input.new_empty(steps, batch, width) if save and wanted else input.new_empty(0)

    return (input.new_empty(steps, batch, state), input.new_empty(batch, state),
            input.new_empty(batch, hidden) if lstm else input.new_empty(0),
            saved(saved_per_unit > 0, saved_per_unit * hidden), saved(True, state),
            saved(lstm, hidden), saved(saved_per_unit == 0 or w_hr is not None, hidden),
            saved(norm_ih_weight is not None, gates), saved(norm_hh_weight is not None, gates),
            saved(lstm and norm_cell_weight is not None, hidden),
            saved(norm_ih_weight is not None or norm_hh_weight is not None
                  or (lstm and norm_cell_weight is not None), 3))


@torch.library.register_fake("rnnfast::backward_with_options")
def _backward_fake(cell, grad_output, grad_h_n, grad_c_n, input, w_ih, w_hh, has_bias, w_hr,
                   norm_ih_weight, norm_hh_weight, norm_cell_weight, has_norm_cell_bias,
                   recurrent_mask, zoneout_mask, zoneout_cell_mask, zoneout, zoneout_cell,
                   lengths, reverse, cell_saved, h_prev, c_prev, h_cell, norm_ih, norm_hh,
                   norm_cell, rstd, input_grad):
    batch = input.shape[1]
    gates = w_ih.shape[0]
    hidden = gates // _ops.GATES[cell]
    lstm = _has_cell_state(cell)
    norm_cell_weight = norm_cell_weight if lstm else None

    def like(tensor, wanted=True):
        return torch.empty_like(tensor) if wanted and tensor is not None else input.new_empty(0)

    return (like(input, input_grad), input.new_empty(batch, w_hh.shape[1]),
            input.new_empty(batch, hidden) if lstm else input.new_empty(0),
            like(w_ih), like(w_hh), input.new_empty(gates if has_bias else 0),
            input.new_empty(gates if has_bias else 0), like(w_hr), like(norm_ih_weight),
            like(norm_hh_weight), like(norm_cell_weight),
            like(norm_cell_weight, has_norm_cell_bias))


@torch.library.register_fake("rnnfast::random_mask")
def _random_mask_fake(seed, size, p, dtype):
    return seed.new_empty(size, dtype=dtype)


# Where the forward's arguments are, in the schema's order (inputs of setup_context).
_CELL, _INPUT, _HX, _CX, _W_IH, _W_HH, _B_IH, _B_HH, _W_HR = range(9)
_NORM_IH, _NORM_HH, _NORM_CELL_WEIGHT, _NORM_CELL_BIAS = range(9, 13)
_RECURRENT_MASK, _ZONEOUT_MASK, _ZONEOUT_CELL_MASK, _ZONEOUT, _ZONEOUT_CELL = range(13, 18)
_LENGTHS, _REVERSE, _SAVE = range(18, 21)
# The tensor arguments the backward reads, and the forward's outputs it reads (after output,
# h_n and c_n), in the order the backward op takes them.
_SAVED_INPUTS = (_INPUT, _W_IH, _W_HH, _W_HR, _NORM_IH, _NORM_HH, _NORM_CELL_WEIGHT,
                 _RECURRENT_MASK, _ZONEOUT_MASK, _ZONEOUT_CELL_MASK, _LENGTHS)
_SAVED_OUTPUTS = slice(3, 11)
# For each forward argument, where backward_with_options returns its gradient (None: none).
_GRADIENT_OF = (None, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11) + (None,) * 8


def below_autograd(op, *arguments):
    """op's own kernel, past its autograd kernel: for calls whose derivative is the Function
    below, or that need none; not where torch.compile or torch.jit.trace records the op."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*arguments)


# The start of the error of every derivative the layers do not have (csrc/options_autograd.cpp
# raises the same).
FIRST_DERIVATIVES_ONLY = ("rnnfast: the layers with cell options (layer_norm, zoneout, dropout "
                          "masks) have first derivatives only: ")


def _setup_context(ctx, inputs, output):
    """What the backward needs from a differentiable call: inputs are the forward's arguments,
    output its results."""
    if not inputs[_SAVE]:
        raise RuntimeError("rnnfast: forward_with_options was run with save=False, so it cannot "
                           "be differentiated; run it with save=True where a gradient is wanted")
    # Plain values and which tensors were given: tuples, few objects per call (the collector
    # of Python's garbage runs by the count of objects made).
    ctx.settings = (inputs[_CELL], inputs[_B_IH] is not None, inputs[_NORM_CELL_BIAS] is not None,
                    inputs[_ZONEOUT], inputs[_ZONEOUT_CELL], inputs[_REVERSE])
    ctx.present = tuple(value is not None for value in inputs)
    ctx.save_for_backward(*(inputs[index] for index in _SAVED_INPUTS), *output[_SAVED_OUTPUTS])
    # Absent gradients need no zeros made for them.
    ctx.set_materialize_grads(False)
    # What the backward reads is an output of the op without a gradient.
    ctx.mark_non_differentiable(*output[_SAVED_OUTPUTS])


def _backward(ctx, grad_output, grad_h_n, grad_c_n):
    if torch.is_grad_enabled():
        # create_graph=True: a gradient that later code differentiates; this one could not be.
        raise RuntimeError(FIRST_DERIVATIVES_ONLY + "their gradients cannot be taken with "
                           "create_graph=True, nor differentiated")
    (input, w_ih, w_hh, w_hr, norm_ih, norm_hh, norm_cell_weight, recurrent_mask, zoneout_mask,
     zoneout_cell_mask, lengths, *saved_outputs) = ctx.saved_tensors
    cell, has_bias, has_norm_cell_bias, zoneout, zoneout_cell, reverse = ctx.settings
    if grad_output is None:
        grad_output = input.new_zeros(input.shape[0], input.shape[1], w_hh.shape[1])
    arguments = (
        cell, grad_output, grad_h_n, grad_c_n if _has_cell_state(cell) else None, input, w_ih,
        w_hh, has_bias, w_hr, norm_ih, norm_hh, norm_cell_weight, has_norm_cell_bias,
        recurrent_mask, zoneout_mask, zoneout_cell_mask, zoneout, zoneout_cell, lengths, reverse,
        *saved_outputs, ctx.needs_input_grad[_INPUT])
    grads = below_autograd(_BACKWARD, *arguments)
    present, wanted = ctx.present, ctx.needs_input_grad
    return tuple(grads[place] if place is not None and present[index] and wanted[index] else None
                 for index, place in enumerate(_GRADIENT_OF))


class LayerWithOptionsForTransforms(torch.autograd.Function):
    """The op with its autograd formula in the form torch.func's transforms (grad, vjp, jacrev,
    vmap) take, which refuse the op's C++ graph node: forward without a context,
    setup_context, and a backward that is itself not differentiated (a second derivative
    raises). Returns all the op's results; under vmap the op runs once per vmapped slice."""

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return below_autograd(_FORWARD, *inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_h_n, grad_c_n, *_):
        return _backward(ctx, grad_output, grad_h_n, grad_c_n)
