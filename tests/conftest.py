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


class StubCascade:
    """A stand-in for :class:`legcomp.inference.Cascade` (no network): the study's own labels when it has
    them, else muscle where water outweighs fat; each study it segments is recorded in ``log``."""

    def __init__(self, region: str, sources: dict, log: "StubLog"):
        from types import SimpleNamespace

        self.region, self.sources, self.log = region, {s: str(p) for s, p in sources.items()}, log
        self.stage1 = SimpleNamespace(device="cpu")

    def predict(self, study, *, return_confidence: bool = False):
        import numpy as np

        self.log.calls.append(study.name)
        if self.log.on_predict is not None:
            self.log.on_predict(len(self.log.calls))
        s1 = study.labels.get("stage1")
        if s1 is None:
            body = study.water + study.fat > np.percentile(study.water + study.fat, 20)
            s1 = np.where(body, np.where(study.water >= study.fat, 2, 1), 0).astype(np.uint8)
        s2 = study.labels.get("stage2", np.zeros_like(s1))
        if not return_confidence:
            return s1, s2
        return s1, s2, {1: np.ones(s1.shape, np.float32), 2: np.ones(s1.shape, np.float32)}


class StubLog:
    """What the stub cascade did: ``calls`` (study names, in order); ``on_predict(n)`` runs before the n-th."""

    def __init__(self):
        self.calls: list[str] = []
        self.on_predict = None


@pytest.fixture
def stub_cascade(monkeypatch, tmp_path_factory):
    """``Cascade.load`` replaced by :class:`StubCascade` (weights files from ``--weights`` or a stub folder,
    hashed for run.json but never loaded). Returns the :class:`StubLog`; ``log.weights`` is the stub folder."""
    from legcomp.inference import cascade as cascade_mod

    log = StubLog()
    log.weights = tmp_path_factory.mktemp("stub_weights")
    for region in ("thigh", "calf"):
        for stage in (1, 2):
            (log.weights / f"{region}_stage{stage}.pt").write_bytes(f"stub {region} {stage}".encode())

    def load(region, weights_dir=None, device="auto"):
        return StubCascade(region, cascade_mod.cascade_paths(region, weights_dir or log.weights), log)

    monkeypatch.setattr(cascade_mod.Cascade, "load", staticmethod(load))
    return log


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """Untrained tiny-config weights of all four networks (plumbing, not accuracy), native working grid."""
    import torch

    from legcomp import anatomy
    from legcomp.models import build_network, save_weights

    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    for region in anatomy.REGIONS:
        for stage in (1, 2):
            model = build_network("tiny", 2, anatomy.n_classes(stage, region))
            save_weights(folder / f"{region}_stage{stage}.pt", model, config="tiny", region=region, stage=stage,
                         patch_size=[32, 32, 8], working_spacing=[None, None, None])
    return folder
