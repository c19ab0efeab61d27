"""Inference tests run their tiny models on one thread: at these sizes the work per op is a few
microseconds, and a second OpenMP thread only adds synchronisation (and, on a busy machine,
waits of milliseconds per op). The previous setting is restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
