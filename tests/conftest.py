import os
import sys
import types
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import reference`

HAS_CUDA = torch.cuda.is_available()

# Every module test takes the `device` fixture: 'cpu', and 'cuda' where a GPU is present (on
# cuda the tests also compare against rnnfast on cpu). Without a GPU the cuda parameters are
# not generated at all, rather than reported as thousands of skips; tests/test_cuda.py reports
# the one skip that says the CUDA tests were not collected.
DEVICES = [pytest.param("cpu", id="cpu")]
if HAS_CUDA:
    DEVICES.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))


def pytest_collection_modifyitems(config, items):
    """Without a GPU, the tests marked `cuda` are deselected (pytest counts them)."""
    if HAS_CUDA:
        return
    needs_gpu = [item for item in items if item.get_closest_marker("cuda")]
    if needs_gpu:
        config.hook.pytest_deselected(items=needs_gpu)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


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
