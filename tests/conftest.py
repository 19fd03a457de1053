"""Shared test set-up: no test inherits a distributed-training environment."""

from __future__ import annotations

import pytest

DDP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""torchrun's variables: ``legcomp.training.train`` goes multi-process when it sees them."""


@pytest.fixture(autouse=True)
def _no_ddp_environment():
    """Clear the DDP variables for each test (a shell or a test that set them cannot leak into others).

    A MonkeyPatch of its own: a test calling ``monkeypatch.undo()`` does not bring them back.
    """
    with pytest.MonkeyPatch.context() as mp:
        for key in DDP_ENV:
            mp.delenv(key, raising=False)
        yield
