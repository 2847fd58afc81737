import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="torch device for core tests")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tests run tiny tensors: extra intra-op threads only add overhead, and on a
    loaded 2-core machine they stall (measured: 30x slower vector-Jacobian products,
    small fits 20x slower)."""
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n_threads)


@pytest.fixture
def device(request):
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(autouse=True)
def _isolate_torch_seed():
    """Keep tests independent of each other's use of the global torch RNG."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)
