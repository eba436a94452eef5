"""Shared test setup. TRITON_INTERPRET must be set before any Triton kernel is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # fresh but reproducible random inputs per test
    torch.manual_seed(0)
    yield
