import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The reference runs many tiny ops: OpenMP fan-out only adds latency (a lot on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
