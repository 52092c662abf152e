import os
import sys
import types
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import reference`

HAS_CUDA = torch.cuda.is_available()

# Every module test takes the `device` fixture: it runs on 'cpu' and on 'cuda'
# (skipped without a GPU).  On cuda the tests also compare against rnnfast on cpu.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda",
                 marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    """Fresh random data per test, reproducible from the test id (file name and
    test name with parameters, independent of where pytest is started)."""
    torch.manual_seed(seed_of(request.node))


def seed_of(node):
    return zlib.crc32(f"{node.path.name}::{node.name}".encode())


def _torch_nn_as_rnnfast():
    """RNNFAST_TESTS_AGAINST=torch: run the suite with torch.nn in place of
    rnnfast (a check of the harness itself; the extras are skipped)."""
    from torch import nn
    return types.SimpleNamespace(
        LSTM=nn.LSTM, GRU=nn.GRU, RNN=nn.RNN,
        LSTMCell=nn.LSTMCell, GRUCell=nn.GRUCell, RNNCell=nn.RNNCell,
        IS_TORCH_NN=True)


@pytest.fixture(scope="session")
def rf():
    """The implementation under test (the rnnfast package)."""
    if os.environ.get("RNNFAST_TESTS_AGAINST") == "torch":
        return _torch_nn_as_rnnfast()
    import rnnfast
    return rnnfast
