"""rnnfast: fused LSTM, GRU and Elman layers for PyTorch, drop-in replacements for torch.nn.

    import rnnfast
    lstm = rnnfast.LSTM(input_size=28, hidden_size=64, batch_first=True)   # as nn.LSTM

The layers run on rnnfast's compiled engines (rnnfast._C): a fused CPU engine and, where the
extension was built with CUDA, a CUDA engine. rnnfast.functional holds the op-level API;
rnnfast.convert(model) turns the torch.nn recurrent layers of an existing model into rnnfast's
(and back, with to="torch").
"""
__version__ = "0.1.0"

import torch

from rnnfast import _ops  # noqa: F401  (loads the compiled extension; clear error if missing)
from rnnfast import functional  # noqa: E402
from rnnfast.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell  # noqa: E402
from rnnfast._convert import convert  # noqa: E402

# torch.load (weights_only, the default) of a whole model with rnnfast layers, as the
# word_language_model example saves it: the classes are safe to rebuild from a checkpoint (and
# a layer's cell options).
torch.serialization.add_safe_globals([LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell,
                                      functional.CellOptions])


def empty_cache():
    """Gives back to the system the free buffers the CPU engine keeps for reuse.

    The CPU engine takes its large tensors (outputs, workspaces, gradients, from 64 KiB) from a
    pool that keeps them when they are freed (up to 128 MiB in all), so that the next call of
    the same shapes does not page-fault on fresh memory; torch.cuda.empty_cache() is the
    analogue for CUDA's caching allocator. With glibc the heap is trimmed after, so the pages
    leave the process's resident memory (glibc keeps freed blocks below its adaptive mmap
    threshold otherwise)."""
    _ops._C.empty_cpu_cache()


def cpu_cache_info():
    """(bytes, blocks) of free buffers the CPU engine keeps for reuse (see empty_cache)."""
    return tuple(_ops._C.cpu_cache_info())


def cpu_capability():
    """The instruction set the CPU engine runs with here: "AVX512", "AVX2" or "DEFAULT" (no
    vector extension).

    The extension holds a copy of the engine's vector code for each, and runs the one ATen
    chooses for its own kernels on this CPU (torch.backends.cpu.get_cpu_capability()); set
    ATEN_CPU_CAPABILITY=avx2 or =default before starting Python to run a narrower one."""
    return _ops._C.cpu_capability()


__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "functional",
           "empty_cache", "cpu_cache_info", "cpu_capability",
           "__version__"]
