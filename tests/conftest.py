import json
from pathlib import Path

import pytest
import torch

from mpe import seed_everything

COSTS = Path(__file__).with_name("costs.json")


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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """The longest files first, so that no worker of ``pytest -n 2 --dist loadfile`` idles while the other finishes a
    long notebook at the end. A file (a notebook, or a test module) is xdist's unit of work; its cost is the seconds
    measured in a clean run of ``make test`` (tests/costs.json, refreshed from its JUnit report by ``python
    tests/costs.py``), 10 s where unknown. xdist hands the files out in this order with ``--no-loadscope-reorder``."""
    seconds = json.loads(COSTS.read_text())["seconds"] if COSTS.exists() else {}

    def file(item):
        return item.nodeid.split("::")[0]

    items.sort(key=lambda item: (-seconds.get(file(item), 10.0), file(item)))  # stable: a file's items keep their order
