import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before Triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import flowkern  # noqa: E402
from fused_backends import whole_model_backends  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts from a known seed, the default backend and the CPU, and leaves it that way."""
    torch.manual_seed(0)
    flowkern.set_backend("auto")
    yield
    flowkern.set_backend("auto")
    torch.set_default_device(None)


@pytest.fixture(params=whole_model_backends(["reference", "native", "triton"]))
def each_backend(request):
    """Each backend in turn, active for the test (whole models on Triton's interpreter marked slow)."""
    reason = flowkern.available_backends(with_reasons=True)[request.param]
    if reason is not None:
        pytest.skip(reason)
    with flowkern.use_backend(request.param):
        yield request.param
