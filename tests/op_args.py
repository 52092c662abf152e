"""Random arguments of the ops for the op-level tests (tests/test_ops.py on the CPU,
tests/test_cuda.py on CUDA)."""
import torch

from rnnfast._ops import GATES

# rnnfast::forward variants by name: keyword arguments of make_args
VARIANTS = {
    "plain": dict(),
    "reverse": dict(reverse=True),
    "nobias": dict(bias=False),
    "lengths": dict(lengths=[4, 1, 3]),
    "lengths_reverse": dict(lengths=[2, 4, 0], reverse=True),
    "zero_state": dict(initial_state=False),
    "zero_state_lengths_reverse": dict(initial_state=False, lengths=[2, 4, 1], reverse=True),
    # Lengths by decreasing length (a packed sequence's order): the CPU engine saves the active
    # rows only.
    "sorted_lengths": dict(lengths=[4, 3, 1]),
    "sorted_lengths_reverse": dict(initial_state=False, lengths=[4, 2, 0], reverse=True),
}


def make_args(cell, steps=4, batch=3, input_size=2, hidden=3, proj=0, bias=True, lengths=None,
              reverse=False, dtype=torch.float64, seed=0, requires_grad=True, device="cpu",
              initial_state=True):
    """Random arguments of rnnfast::forward on `device` (a list, in schema order);
    initial_state=False passes hx = cx = None (zero initial states)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = torch.randn(*shape, generator=generator, dtype=dtype).to(device)
        return t.requires_grad_(requires_grad)

    gates = GATES[cell] * hidden
    state = proj if proj else hidden
    is_lstm = cell.startswith("lstm")
    return [
        cell,
        rand(steps, batch, input_size),
        rand(batch, state) if initial_state else None,
        rand(batch, hidden) if is_lstm and initial_state else None,
        rand(gates, input_size),
        rand(gates, state),
        rand(gates) if bias else None,
        rand(gates) if bias else None,
        rand(proj, hidden) if proj else None,
        torch.tensor(lengths, dtype=torch.int64, device=device) if lengths is not None else None,
        reverse,
        True,
    ]


def differentiable_outputs(*args):
    """rnnfast::forward's results that have a gradient (c_n only for LSTM cells)."""
    output, h_n, c_n, _ = torch.ops.rnnfast.forward(*args)
    return (output, h_n, c_n) if c_n.numel() else (output, h_n)


def backward_args(forward_args, forward_results, grad_output, grad_h_n, grad_c_n):
    """rnnfast::backward's arguments (a tuple, in schema order) for the forward call with
    `forward_args` that returned `forward_results`, with the input's gradient asked for."""
    cell, input, hx, cx, w_ih, w_hh, b_ih, _, w_hr, lengths, reverse, _ = forward_args
    output, _, _, workspace = forward_results
    return (cell, grad_output, grad_h_n, grad_c_n, input, hx, cx, w_ih, w_hh, b_ih is not None,
            w_hr, lengths, reverse, output, workspace, True)
