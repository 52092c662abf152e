"""torch's intra-op thread count for a block of a test."""
import contextlib

import torch


@contextlib.contextmanager
def torch_threads(count):
    """torch's thread count set to count for the block, restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
