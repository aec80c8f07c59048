import pytest
import torch

from mpe import seed_everything


@pytest.fixture(autouse=True)
def _seed():
    seed_everything(0)
    yield


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
