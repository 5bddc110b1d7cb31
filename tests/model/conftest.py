"""Model tests run single-threaded: tiny tensors, where thread hand-offs cost more than they save
(and the CI machine's two cores are shared with the rest of the suite)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
