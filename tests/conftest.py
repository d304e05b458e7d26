"""Test-session settings shared by every module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The test models are tiny: thread hand-offs, not arithmetic, dominate their run time, and on a
    # busy 2-core machine two threads make each forward pass tens of times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
