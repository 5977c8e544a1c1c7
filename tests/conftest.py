import os
import zlib

import torch

# Without a GPU, Triton kernels run in its interpreter (must be set before triton.jit runs).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "xdist_group(name): keep these tests on one pytest-xdist worker")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh data per case, reproducible from the test id in any process (str hashes are salted per process).
    seed = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    torch.manual_seed(seed)
    yield


def pytest_runtest_logreport(report):
    # W4A16_TIMINGS=FILE: one line per test phase as it ends (outcome, seconds, id), so a run cut off by a time
    # limit still says which tests were slow or failed (pytest's own summary only prints at the end).
    if os.environ.get("PYTEST_XDIST_WORKER"):  # under pytest -n the controller gets every report: write there once
        return
    path = os.environ.get("W4A16_TIMINGS")
    if path and (report.when == "call" or report.outcome != "passed" or report.duration > 1.0):
        with open(path, "a") as f:
            f.write(f"{report.outcome:8s} {report.when:8s} {report.duration:8.2f} {report.nodeid}\n")
