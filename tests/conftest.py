import pytest
import torch
import zennit

from lrp_brain.versions import zennit_version


def pytest_report_header(config):
    return f'zennit {zennit_version()} from {zennit.__file__}'


@pytest.fixture(scope='module')
def single_threaded():
    """Run a test module with one torch thread: on tensors this small the thread pool only adds overhead, and on a
    busy machine its spinning threads make the tests many times slower. The previous count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
