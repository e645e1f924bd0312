import pytest
import torch

import flowkern


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts from a known seed and the default backend, and leaves it that way."""
    torch.manual_seed(0)
    flowkern.set_backend("auto")
    yield
    flowkern.set_backend("auto")

