"""rnnfast: fused LSTM, GRU and Elman layers for PyTorch, drop-in replacements for torch.nn.

    import rnnfast
    lstm = rnnfast.LSTM(input_size=28, hidden_size=64, batch_first=True)   # as nn.LSTM

The layers run on rnnfast's compiled engines (rnnfast._C): a fused CPU engine and, where the
extension was built with CUDA, a CUDA engine. rnnfast.functional holds the op-level API.
"""
__version__ = "0.1.0"

from rnnfast import _ops  # noqa: F401  (loads the compiled extension; clear error if missing)
from rnnfast import functional  # noqa: E402
from rnnfast.modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell  # noqa: E402

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "functional", "__version__"]
