"""Inference tests run their tiny models on one thread: at these sizes the work per op is a few
microseconds, and a second OpenMP thread only adds synchronisation (and, on a busy machine,
waits of milliseconds per op). The previous setting is restored after each test."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs torch on one thread (tests.conftest.one_thread)."""
