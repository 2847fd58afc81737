import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Core tests run tiny tensors: extra intra-op threads only add overhead, and on a
    loaded 2-core machine they stall (measured: 30x slower vector-Jacobian products)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)
