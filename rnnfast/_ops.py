"""Loads the compiled extension and teaches PyTorch the ops' shapes.

The ops (rnnfast::forward, rnnfast::backward), their CPU and CUDA kernels and their autograd
formula (csrc/autograd.cpp) are registered by the extension in C++; here they get fake (meta)
implementations, so torch.compile and the fake-tensor machinery can trace them.
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
        current = source_hash(_SOURCE_ROOT, with_cuda=bool(_C.with_cuda))
        if built_from != current and os.environ.get("RNNFAST_ALLOW_STALE") != "1":
            raise ImportError(
                "rnnfast's compiled extension rnnfast._C is stale: it was built from other "
                f"sources than those in {os.path.join(_SOURCE_ROOT, 'csrc')} (built from "
                f"{built_from or 'unknown sources'}, sources now {current}). {_BUILD_HINT} "
                "Set RNNFAST_ALLOW_STALE=1 to load it anyway."
            )
    return _C


_C = _load_extension()

# Each cell's name (the ops' `cell` argument), gates per hidden unit and values saved per unit
# for the backward, from the extension's one table of them (csrc/cells.h); the fake
# implementations need the shapes.
CELLS = _C.cells
GATES = {name: cell["gates"] for name, cell in CELLS.items()}
_SAVED_PER_UNIT = {name: cell["saved_per_unit"] for name, cell in CELLS.items()}


def workspace_width(cell, hidden_size, has_projection):
    """Columns of the forward's workspace [T, B, W] or [rows, W] (csrc/ops.cpp:
    workspace_width)."""
    return (_SAVED_PER_UNIT[cell] + (1 if has_projection else 0)) * hidden_size


@torch.library.register_fake("rnnfast::forward")
def _forward_fake(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                  save_workspace, batch_first=False):
    if batch_first:
        batch, steps, _ = input.shape
    else:
        steps, batch, _ = input.shape
    hidden = w_ih.shape[0] // GATES[cell]
    state = w_hh.shape[1]
    # batch_first: the view [B, T, P] of the time-major output, as the engines return it.
    output = input.new_empty(steps, batch, state)
    if batch_first:
        output = output.transpose(0, 1)
    h_n = input.new_empty(batch, state)
    c_n = input.new_empty(batch, hidden) if CELLS[cell]["has_cell_state"] else input.new_empty(0)
    width = workspace_width(cell, hidden, w_hr is not None)
    if not save_workspace:
        workspace = input.new_empty(0)
    elif lengths is not None:
        # [rows, W]: all T * B rows, or a packed sequence's active rows only, as the engine
        # chooses (csrc/layer.h: returned_workspace).
        # (A bound only where the sizes are known: symbolic ones are refused as bounds.)
        bound = steps * batch if isinstance(steps * batch, int) else None
        rows = torch.library.get_ctx().new_dynamic_size(max=bound)
        workspace = input.new_empty(rows, width)
    else:
        workspace = input.new_empty(steps, batch, width)
    return output, h_n, c_n, workspace


@torch.library.register_fake("rnnfast::backward")
def _backward_fake(cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, has_bias,
                   w_hr, lengths, reverse, output, workspace, input_grad, batch_first=False,
                   state_grad=True):
    # An absent gradient is an empty tensor of its own (outputs must not alias).
    if not input_grad:
        grad_input = input.new_empty(0)
    elif batch_first:
        # The view [B, T, I] of a time-major gradient, as the engines return it.
        grad_input = input.new_empty(input.transpose(0, 1).shape).transpose(0, 1)
    else:
        grad_input = torch.empty_like(input)
    return (
        grad_input,
        torch.empty_like(hx) if hx is not None and state_grad else input.new_empty(0),
        torch.empty_like(cx) if cx is not None and state_grad else input.new_empty(0),
        torch.empty_like(w_ih),
        torch.empty_like(w_hh),
        input.new_empty(w_ih.shape[0] if has_bias else 0),
        input.new_empty(w_ih.shape[0] if has_bias else 0),
        torch.empty_like(w_hr) if w_hr is not None else input.new_empty(0),
    )


def _forward_autocast_cpu(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse,
                          save_workspace, batch_first=False):
    """rnnfast::forward under torch.autocast("cpu"): the layer runs in the autocast dtype, as
    torch.nn's LSTM does there (and as the CUDA engine's rule in csrc/cuda/engine.cu does under
    autocast("cuda")). The casts are recorded by autograd, so the gradients of float32
    parameters come back in float32."""
    dtype = torch.get_autocast_dtype("cpu")

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() else t

    with torch._C._ExcludeDispatchKeyGuard(
            torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
        return torch.ops.rnnfast.forward.default(
            cell, cast(input), cast(hx), cast(cx), cast(w_ih), cast(w_hh), cast(b_ih), cast(b_hh),
            cast(w_hr), lengths, reverse, save_workspace, batch_first)


_AUTOCAST_LIBRARY = None
# The CUDA engine registers its autocast rule in C++; the CPU one is this Python one (an
# extension built to emulate CUDA on the CPU, in tests, brings its own).
if not torch._C._dispatch_has_kernel_for_dispatch_key("rnnfast::forward", "AutocastCPU"):
    _AUTOCAST_LIBRARY = torch.library.Library("rnnfast", "IMPL")
    _AUTOCAST_LIBRARY.impl("forward", _forward_autocast_cpu, "AutocastCPU")
