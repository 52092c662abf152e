"""Loads the compiled extension and teaches PyTorch the ops' shapes and gradients.

The ops themselves (rnnfast::forward, rnnfast::backward) are registered by the extension in C++
(csrc/ops.cpp); here they get a fake (meta) implementation, so torch.compile can trace them, and
an autograd formula, so they are differentiable.
"""
import os

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCE_ROOT = os.path.dirname(_PACKAGE_DIR)
_BUILD_HINT = (
    "Build it from the project folder with:\n"
    "    pip install -e . --no-build-isolation\n"
    "(torch must be installed first; see README.md)."
)


def _load_extension():
    """Imports rnnfast._C, turning a missing, broken or stale build into an explanation."""
    try:
        from rnnfast import _C
    except ImportError as error:
        raise ImportError(
            f"rnnfast's compiled extension rnnfast._C is missing or cannot be loaded ({error}). "
            f"If torch was upgraded since the build, the extension must be rebuilt. {_BUILD_HINT}"
        ) from error
    if os.path.isdir(os.path.join(_SOURCE_ROOT, "csrc")):
        # Running from a source checkout: the sources may have changed since the build.
        from rnnfast._source_hash import source_hash

        try:
            from rnnfast._built_from import SOURCE_HASH as built_from
        except ImportError:
            built_from = None
        current = source_hash(_SOURCE_ROOT)
        if built_from != current and os.environ.get("RNNFAST_ALLOW_STALE") != "1":
            raise ImportError(
                "rnnfast's compiled extension rnnfast._C is stale: it was built from other "
                f"sources than those in {os.path.join(_SOURCE_ROOT, 'csrc')} (built from "
                f"{built_from or 'unknown sources'}, sources now {current}). {_BUILD_HINT} "
                "Set RNNFAST_ALLOW_STALE=1 to load it anyway."
            )
    return _C


_C = _load_extension()

# Gates per hidden unit and values saved per unit for the backward, per cell name; these mirror
# kGates and kSavedPerUnit in csrc/cells.h (the fake implementations need the shapes).
GATES = {"lstm": 4, "lstm_relu": 4, "lstm_sigmoid": 4, "gru": 3,
         "rnn_tanh": 1, "rnn_relu": 1, "rnn_sigmoid": 1}
_SAVED_PER_UNIT = {"lstm": 5, "lstm_relu": 5, "lstm_sigmoid": 5, "gru": 4,
                   "rnn_tanh": 0, "rnn_relu": 0, "rnn_sigmoid": 0}


def workspace_width(cell, hidden_size, has_projection):
    """Columns of the forward's workspace [T, B, W] (csrc/ops.cpp: workspace_width)."""
    return (_SAVED_PER_UNIT[cell] + (1 if has_projection else 0)) * hidden_size


@torch.library.register_fake("rnnfast::forward")
def _forward_fake(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                  save_workspace):
    steps, batch, _ = input.shape
    hidden = w_ih.shape[0] // GATES[cell]
    state = hx.shape[1]
    output = input.new_empty(steps, batch, state)
    h_n = input.new_empty(batch, state)
    c_n = input.new_empty(batch, hidden) if cx is not None else input.new_empty(0)
    if save_workspace:
        workspace = input.new_empty(steps, batch, workspace_width(cell, hidden, w_hr is not None))
    else:
        workspace = input.new_empty(0)
    return output, h_n, c_n, workspace


@torch.library.register_fake("rnnfast::backward")
def _backward_fake(cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, has_bias,
                   w_hr, lengths, reverse, output, workspace, input_grad):
    # An absent gradient is an empty tensor of its own (outputs must not alias).
    return (
        torch.empty_like(input) if input_grad else input.new_empty(0),
        torch.empty_like(hx),
        torch.empty_like(cx) if cx is not None else input.new_empty(0),
        torch.empty_like(w_ih),
        torch.empty_like(w_hh),
        input.new_empty(w_ih.shape[0] if has_bias else 0),
        input.new_empty(w_ih.shape[0] if has_bias else 0),
        torch.empty_like(w_hr) if w_hr is not None else input.new_empty(0),
    )


def _forward_setup_context(ctx, inputs, output):
    cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, save_workspace = inputs
    out, _, _, workspace = output
    ctx.cell = cell
    ctx.reverse = reverse
    ctx.has_bias = b_ih is not None
    ctx.saved_workspace = save_workspace
    ctx.save_for_backward(input, hx, cx, w_ih, w_hh, w_hr, lengths, out, workspace)


def _forward_backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_workspace):
    if not ctx.saved_workspace:
        raise RuntimeError(
            "rnnfast::forward ran with save_workspace=False, so it cannot be differentiated; "
            "call it with save_workspace=True when gradients are needed")
    input, hx, cx, w_ih, w_hh, w_hr, lengths, output, workspace = ctx.saved_tensors
    if grad_output is None:
        grad_output = torch.zeros_like(output)
    if grad_h_n is None:
        grad_h_n = torch.zeros_like(hx)
    if cx is None:
        grad_c_n = None
    elif grad_c_n is None:
        grad_c_n = torch.zeros_like(cx)
    grads = torch.ops.rnnfast.backward(
        ctx.cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, ctx.has_bias,
        w_hr, lengths, ctx.reverse, output, workspace, ctx.needs_input_grad[1])
    grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr = grads
    return (
        None,
        grad_input if ctx.needs_input_grad[1] else None,
        grad_hx,
        grad_cx if cx is not None else None,
        grad_w_ih,
        grad_w_hh,
        grad_b_ih if ctx.has_bias else None,
        grad_b_hh if ctx.has_bias else None,
        grad_w_hr if w_hr is not None else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "rnnfast::forward", _forward_backward, setup_context=_forward_setup_context)


def _backward_not_differentiable(ctx, *grads):
    raise RuntimeError("rnnfast: double backward (gradients of gradients) is not supported")


torch.library.register_autograd("rnnfast::backward", _backward_not_differentiable)
