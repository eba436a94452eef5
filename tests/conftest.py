"""Shared test setup. TRITON_INTERPRET must be set before any Triton kernel is imported."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# no latency tables are measured in tests (layout="auto" without a table is "exact"), and the
# user's cached tables are not read: tests that need one write a fake one here
os.environ["PYENGINE_LATENCY"] = "off"
os.environ["PYENGINE_CACHE"] = tempfile.mkdtemp(prefix="pyengine-test-cache-")
atexit.register(shutil.rmtree, os.environ["PYENGINE_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # fresh but reproducible random inputs per test
    torch.manual_seed(0)
    yield
