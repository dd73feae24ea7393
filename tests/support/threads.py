"""One intra-op thread for tests of tiny tensors (the machine's cores may be shared)."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)``: tensors this small run fastest without
    thread synchronization, and parallel tests do not oversubscribe shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
