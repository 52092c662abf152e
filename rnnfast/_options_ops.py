"""The layer with cell options (layer normalisation, zoneout, recurrent dropout) as ops:
rnnfast::forward_with_options and rnnfast::backward_with_options (csrc/layer_options.h), their
fake implementations for torch.compile, and the forward's autograd formula."""
import torch

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
            saved(lstm, hidden), saved(True, hidden),
            saved(norm_ih_weight is not None, gates), saved(norm_hh_weight is not None, gates),
            saved(lstm and norm_cell_weight is not None, hidden), saved(True, 3))


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

    return [like(input, input_grad), input.new_empty(batch, w_hh.shape[1]),
            input.new_empty(batch, hidden) if lstm else input.new_empty(0),
            like(w_ih), like(w_hh), input.new_empty(gates if has_bias else 0),
            input.new_empty(gates if has_bias else 0), like(w_hr), like(norm_ih_weight),
            like(norm_hh_weight), like(norm_cell_weight),
            like(norm_cell_weight, has_norm_cell_bias)]


# The forward's arguments by name, in the schema's order.
_ARGUMENTS = ("cell", "input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr",
              "norm_ih_weight", "norm_hh_weight", "norm_cell_weight", "norm_cell_bias",
              "recurrent_mask", "zoneout_mask", "zoneout_cell_mask", "zoneout", "zoneout_cell",
              "lengths", "reverse", "save")
# The forward's tensor arguments that have a gradient, and where backward_with_options returns it.
_GRADIENT_OF = {"input": 0, "hx": 1, "cx": 2, "w_ih": 3, "w_hh": 4, "b_ih": 5, "b_hh": 6,
                "w_hr": 7, "norm_ih_weight": 8, "norm_hh_weight": 9, "norm_cell_weight": 10,
                "norm_cell_bias": 11}
# The forward's outputs the backward reads, after output, h_n and c_n.
_SAVED_OUTPUTS = slice(3, 11)


def _setup_context(ctx, inputs, output):
    arguments = dict(zip(_ARGUMENTS, inputs))
    if not arguments["save"]:
        raise RuntimeError("rnnfast: forward_with_options was run with save=False, so it cannot "
                           "be differentiated; run it with save=True where a gradient is wanted")
    ctx.arguments = {name: value for name, value in arguments.items()
                     if not isinstance(value, torch.Tensor)}
    tensor_names = [name for name, value in arguments.items() if isinstance(value, torch.Tensor)]
    ctx.tensor_names = tensor_names
    ctx.present = {name: arguments[name] is not None for name in _ARGUMENTS}
    ctx.save_for_backward(*(arguments[name] for name in tensor_names), *output[_SAVED_OUTPUTS])
    # What the backward reads has no gradient; nor do absent ones need zeros made for them.
    ctx.mark_non_differentiable(*output[_SAVED_OUTPUTS])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, *_):
    saved = ctx.saved_tensors
    count = len(ctx.tensor_names)
    tensors = dict(zip(ctx.tensor_names, saved[:count]))
    arguments = {**ctx.arguments, **tensors}
    get = arguments.get
    input = arguments["input"]
    if grad_output is None:
        grad_output = input.new_zeros(input.shape[0], input.shape[1], arguments["w_hh"].shape[1])
    grads = _BACKWARD(
        arguments["cell"], grad_output, grad_h_n,
        grad_c_n if _has_cell_state(arguments["cell"]) else None, input, arguments["w_ih"],
        arguments["w_hh"], ctx.present["b_ih"], get("w_hr"), get("norm_ih_weight"),
        get("norm_hh_weight"), get("norm_cell_weight"), ctx.present["norm_cell_bias"],
        get("recurrent_mask"), get("zoneout_mask"), get("zoneout_cell_mask"),
        arguments["zoneout"], arguments["zoneout_cell"], get("lengths"), arguments["reverse"],
        *saved[count:], ctx.needs_input_grad[1])
    result = []
    for index, name in enumerate(_ARGUMENTS):
        position = _GRADIENT_OF.get(name)
        wanted = position is not None and ctx.present[name] and ctx.needs_input_grad[index]
        result.append(grads[position] if wanted else None)
    return tuple(result)


torch.library.register_autograd("rnnfast::forward_with_options", _backward,
                                setup_context=_setup_context)
