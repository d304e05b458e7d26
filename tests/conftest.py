"""Test-session settings shared by every module."""

import os
import tempfile

import pytest
import torch

# The timed --linear-kernel auto verdict is stored per machine; the tests keep theirs in a folder of their
# own (inherited by the CLI and server processes they start), so all of them take the same kernel.
os.environ["TEACACHE_MODELS_CACHE"] = tempfile.mkdtemp(prefix="teacache-models-test-cache-")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The test models are tiny: thread hand-offs, not arithmetic, dominate their run time, and on a
    # busy 2-core machine two threads make each forward pass tens of times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
