"""Multi-layer, bidirectional recurrent networks on top of rnnfast's one-layer ops.

Everything here works on time-major tensors, input [T, B, I], or with batch_first=True on
[B, T, I] (the ops take that layout as it is). The modules (rnnfast/modules.py) translate
unbatched and packed inputs to the time-major form.
"""
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch._C._functorch import TransformType, get_interpreter_stack
from torch.autograd import forward_ad
from torch.autograd.function import once_differentiable

from rnnfast import _ops  # noqa: F401  (loads the extension and registers the ops)
from rnnfast import _options_ops


# The op's overload itself: calling it skips the overload resolution of torch.ops.rnnfast.forward.
_FORWARD = torch.ops.rnnfast.forward.default
# The forward as ATen ops, differentiable to any order (csrc/differentiable_layer.cpp).
_DIFFERENTIABLE_FORWARD = torch.ops.rnnfast.differentiable_forward.default
# The layer with cell options (rnnfast/_options_ops.py).
_FORWARD_WITH_OPTIONS = _options_ops._FORWARD
_RANDOM_MASK = torch.ops.rnnfast.random_mask.default
# Set to "1", the layers with cell options run on CUDA tensors (csrc/cuda/options_engine.cu);
# without it they raise NotImplementedError there, as that engine has not yet run on a GPU.
CUDA_CELL_OPTIONS = "RNNFAST_CUDA_CELL_OPTIONS"


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
        x = _next_layer_input(outputs, index, num_layers, dropout, training, lengths,
                              share_saved_outputs=True)
    return x, torch.stack(h_n), (torch.stack(c_n) if has_cell_state else None)


def _next_layer_input(outputs, index, num_layers, dropout, training, lengths,
                      share_saved_outputs=False):
    """Layer `index`'s output (its directions' concatenated), with torch.nn's dropout where
    another layer follows.

    share_saved_outputs: the outputs are the `layer` op's. Below the last layer the graph nodes
    of eager calls then save views of the concatenation in place of the directions' outputs,
    whose memory goes (the concatenation is the next layer's input, which its nodes save
    anyway). The last layer's outputs are kept: the stack's output is the caller's, who may
    change it in place before the backward, which torch.nn's bidirectional layers allow."""
    x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    if (share_saved_outputs and len(outputs) > 1 and index < num_layers - 1
            and x.requires_grad and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()):  # (a trace would record the views)
        width = outputs[0].size(2)
        for direction, out in enumerate(outputs):
            _ops._C.share_saved_output(out, x.narrow(2, direction * width, width))
    if dropout > 0 and training and index < num_layers - 1:
        x = _dropout_between_layers(x, dropout, lengths)
    return x


def _dropout_between_layers(x, p, lengths):
    """Dropout of a layer's output as torch.nn draws it: on the [T, B, D * P] tensor, or, for a
    packed sequence (lengths given), on its packed data [sum(lengths), D * P], so that a seeded
    run consumes torch's generator as torch.nn's does."""
    if lengths is None:
        return F.dropout(x, p=p, training=True)
    if torch.compiler.is_compiling():
        # Outside the graph (a graph break), since the packed data's shape is the sum of the
        # lengths' values, which tracing cannot know.
        return _outside_graph(_packed_dropout)(x, p, lengths)
    return _packed_dropout(x, p, lengths)


def _outside_graph(function):
    """function to be run outside torch.compile's graph (a graph break around each call). Only
    called while compiling: torch.compiler.disable imports torch._dynamo, which at import time
    would add 1.2 s and 800 modules to `import rnnfast`. Each function is wrapped once: the
    compiled model's eager code between its graphs calls this at every call (5 us a wrapping)."""
    wrapped = _OUTSIDE_GRAPH.get(function)
    if wrapped is None:
        wrapped = _OUTSIDE_GRAPH[function] = torch.compiler.disable(function)
    return wrapped


_OUTSIDE_GRAPH = {}


def _packed_dropout(x, p, lengths):
    lengths_cpu = lengths.cpu()
    data, batch_sizes = torch._pack_padded_sequence(x, lengths_cpu, False)
    data = F.dropout(data, p=p, training=True)
    padded, _ = torch._pad_packed_sequence(data, batch_sizes, False, 0.0, x.size(0))
    return padded


class CellOptions(NamedTuple):
    """The cell options beyond torch.nn of a layer stack (all off by default).

    layer_norm: normalise x W_ih^T and h W_hh^T of each step (and the LSTM's cell state before
    its output activation), each with its own gain; the layer's biases are the normalisations'
    biases (Ba, Kiros and Hinton 2016).
    zoneout, zoneout_cell: in training each unit of h (and of the LSTM's c) keeps its previous
    value with this probability, per step; in evaluation the expectation (Krueger et al. 2017).
    recurrent_dropout: in training, one dropout mask per sequence on h before the recurrent
    product (Gal and Ghahramani 2016; Keras' recurrent_dropout).
    input_dropout: in training, one dropout mask per sequence on each layer's input x (Keras'
    dropout of a recurrent layer).
    """
    layer_norm: bool = False
    zoneout: float = 0.0
    zoneout_cell: float = 0.0
    recurrent_dropout: float = 0.0
    input_dropout: float = 0.0

    def any(self):
        return self != CellOptions()

    def acting(self, training):
        """Whether any option changes the layer's computation in this mode: the dropouts act in
        training only, so an evaluating layer with no other option is torch.nn's layer."""
        return self.in_the_cell(training) or (training and self.input_dropout > 0)

    def draws_masks(self, training):
        """Whether the layer draws random masks from torch's generator in this mode."""
        return training and (self.zoneout > 0 or self.zoneout_cell > 0
                             or self.recurrent_dropout > 0 or self.input_dropout > 0)

    def in_the_cell(self, training):
        """Whether an option acts inside the time loop in this mode, so that the layer runs the
        options' op: the input dropout multiplies x before it, and the plain op runs the rest."""
        return (self.layer_norm or self.zoneout > 0 or self.zoneout_cell > 0
                or (training and self.recurrent_dropout > 0))


def layer_with_options(cell, input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None,
                       norm_ih_weight=None, norm_hh_weight=None, norm_cell_weight=None,
                       norm_cell_bias=None, recurrent_mask=None, zoneout_mask=None,
                       zoneout_cell_mask=None, zoneout=0.0, zoneout_cell=0.0, lengths=None,
                       reverse=False):
    """One layer in one direction with cell options; the masks are given (stacked_with_options
    says how the layers draw them), so the result is a function of its arguments that tests can
    reproduce.

    input [T, B, I] (time-major); hx, cx, weights, biases, lengths as in layer (lengths: int64,
    given to the op on the CPU); norm_ih_weight, norm_hh_weight [G]: layer_norm's gains of x W_ih^T and
    h W_hh^T, whose biases are b_ih and b_hh; norm_cell_weight, norm_cell_bias [H]: the LSTM
    cell state's; recurrent_mask [B, P] multiplies h before the recurrent product (0 or
    1 / (1 - p)); zoneout_mask [T, B, P] and zoneout_cell_mask [T, B, H]: 1 where a unit keeps
    its previous value at a step, or None with zoneout / zoneout_cell the probability of it
    (the expectation, as in evaluation). Returns output [T, B, P], h_n [B, P] and c_n [B, H]
    (an empty tensor for non-LSTM cells). bfloat16 and float16 layers run in float32. On CUDA
    tensors only with RNNFAST_CUDA_CELL_OPTIONS=1 (not yet validated on a GPU).
    """
    if input.device.type != "cpu" and not (input.device.type == "cuda"
                                           and os.environ.get(CUDA_CELL_OPTIONS) == "1"):
        raise NotImplementedError(
            "rnnfast: layer_norm, zoneout, recurrent_dropout and input_dropout run on the CPU "
            f"engine only so far; the layer's input is on {input.device}. The CUDA engine's "
            f"implementation is opt-in with the environment variable {CUDA_CELL_OPTIONS}=1: it "
            "has been checked against the CPU engine in a host emulation but not yet validated "
            "on a GPU")
    if lengths is not None:
        # The op takes the lengths as a CPU int64 tensor on every device.
        lengths = lengths.cpu()
    tensors = (input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, norm_ih_weight, norm_hh_weight,
               norm_cell_weight, norm_cell_bias, recurrent_mask, zoneout_mask, zoneout_cell_mask)
    dtype = input.dtype
    if dtype in (torch.bfloat16, torch.float16):
        tensors = tuple(t.float() if t is not None else None for t in tensors)
    # torch.jit.trace records the save flag as a constant, which the traced module then passes
    # in any grad mode (and the trace's check runs under no_grad): a trace always saves, so that
    # the traced module can be differentiated and its check records the same graph.
    tracing = torch.jit.is_tracing()
    needs_grad = tracing or (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors))
    arguments = (cell, *tensors, zoneout, zoneout_cell, lengths, reverse, needs_grad)
    if not torch.compiler.is_compiling() and _has_tangent(tensors):
        # The op would drop the tangents: the output would have none.
        raise RuntimeError(_options_ops.FIRST_DERIVATIVES_ONLY +
                           "forward-mode AD (dual tensors) cannot differentiate them")
    transforms = torch._C._are_functorch_transforms_active()
    if transforms:
        keys = [interpreter.key() for interpreter in get_interpreter_stack()]
        if TransformType.Jvp in keys or keys.count(TransformType.Grad) > 1:
            raise RuntimeError(_options_ops.FIRST_DERIVATIVES_ONLY +
                               "torch.func's nested grad transforms (second derivatives) and "
                               "forward mode (jvp, jacfwd, hessian) cannot differentiate them")
    recorded = torch.compiler.is_compiling() or tracing
    if not recorded and not needs_grad:
        output, h_n, c_n = _options_ops.below_autograd(_FORWARD_WITH_OPTIONS, *arguments)[:3]
    elif not recorded and transforms:
        output, h_n, c_n = _options_ops.LayerWithOptionsForTransforms.apply(*arguments)[:3]
    else:
        # The op with its autograd, a C++ graph node (csrc/options_autograd.cpp), which
        # torch.compile and torch.jit.trace record.
        output, h_n, c_n = _FORWARD_WITH_OPTIONS(*arguments)[:3]
    if dtype != output.dtype:
        output, h_n, c_n = output.to(dtype), h_n.to(dtype), c_n.to(dtype)
    return output, h_n, c_n


def _has_tangent(tensors):
    """Whether a tensor carries a forward-mode AD tangent (a dual tensor), which it can only
    inside torch.autograd.forward_ad.dual_level (forward_ad's current level is then 0 or more)."""
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _mask_dtype(like):
    # The layer runs bfloat16 and float16 in float32, and so takes their masks.
    return torch.float32 if like.dtype in (torch.bfloat16, torch.float16) else like.dtype


def _keep_mask(shape, p, like, dtype=None):
    """A dropout mask of `shape`: 0 with probability p, else 1 / (1 - p)."""
    mask = torch.empty(shape, dtype=dtype or _mask_dtype(like), device=like.device)
    return mask.bernoulli_(1 - p).div_(1 - p)


def _zoneout_mask(shape, p, like):
    """1 where a unit keeps its previous value (probability p), else 0, on like's device.

    On the CPU, rnnfast::random_mask from one int64 seed drawn from torch's generator: a sixth
    to an eighth of torch.rand's time on these [T, B, P] masks. Elsewhere torch.rand(...) < p."""
    if like.device.type != "cpu":
        return (torch.rand(shape, device=like.device) < p).to(_mask_dtype(like))
    seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
    return _RANDOM_MASK(seed, shape, p, _mask_dtype(like))


def stacked_with_options(cell, input, hx, cx, weights, norms, num_layers, bidirectional,
                         options, dropout=0.0, training=False, lengths=None, batch_first=False):
    """stacked with cell options (CellOptions). norms: for each layer and direction a tuple
    (norm_ih_weight, norm_hh_weight, norm_cell_weight, norm_cell_bias), None where absent.

    In training the masks are drawn from torch's generator per layer, per direction, in this
    order: the input dropout mask [B, I] and the recurrent dropout mask [B, P] (bernoulli_ of
    1 - p), the zoneout masks of h [T, B, P] and of c [T, B, H] (_zoneout_mask); a seeded run
    draws the same masks.
    """
    has_cell_state = _ops.CELLS[cell]["has_cell_state"]
    x = input.transpose(0, 1) if batch_first else input
    steps, batch = x.shape[0], x.shape[1]
    lengths_cpu = lengths.cpu() if lengths is not None else None
    directions = 2 if bidirectional else 1
    h_n, c_n = [], []
    for index in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = index * directions + direction
            w_ih, w_hh, b_ih, b_hh, w_hr = weights[k]
            state_size, hidden_size = w_hh.shape[1], w_ih.shape[0] // _ops.GATES[cell]
            x_in = x
            recurrent_mask = zoneout_mask = zoneout_cell_mask = None
            if training:
                if options.input_dropout > 0:
                    x_in = x * _keep_mask((batch, x.shape[2]), options.input_dropout, x, x.dtype)
                if options.recurrent_dropout > 0:
                    recurrent_mask = _keep_mask((batch, state_size), options.recurrent_dropout, x)
                if options.zoneout > 0:
                    zoneout_mask = _zoneout_mask((steps, batch, state_size), options.zoneout, x)
                if options.zoneout_cell > 0:
                    zoneout_cell_mask = _zoneout_mask((steps, batch, hidden_size),
                                                      options.zoneout_cell, x)
            h0 = hx[k] if hx is not None else None
            c0 = cx[k] if cx is not None else None
            if options.in_the_cell(training):
                out, h, c = layer_with_options(
                    cell, x_in, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                    *(norms[k] if norms else (None,) * 4), recurrent_mask, zoneout_mask,
                    zoneout_cell_mask, options.zoneout, options.zoneout_cell, lengths_cpu,
                    reverse=direction == 1)
            else:
                # Only the input dropout acts, on x_in: the plain layer runs the rest.
                out, h, c = layer(cell, x_in, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
                                  reverse=direction == 1)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = _next_layer_input(outputs, index, num_layers, dropout, training, lengths)
    output = x.transpose(0, 1) if batch_first else x
    return output, _stack_states(h_n), (_stack_states(c_n) if has_cell_state else None)


def _stack_states(states):
    """The final states [L * D, B, width] of a stack from each layer's and direction's [B, width]:
    for one layer in one direction a view of its state, which torch.stack would copy (with a graph
    node of its own in the forward and in the backward)."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)
