import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def official_fixtures_dir() -> Path | None:
    """``../shared/fixtures/official`` beside the checkout (or ``$ASAG_FIXTURES``)."""
    env = os.environ.get("ASAG_FIXTURES")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "fixtures" / "official")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = official_fixtures_dir()
    if path is None:
        pytest.skip("official reference fixtures not found (set ASAG_FIXTURES)")
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A folder with ``ckpt.pth`` (the ``tiny_cpu`` preset, random weights, seed 0) and ``data/`` (a
    synthetic data set of 2 train and 2 validation images that the checkpoint's configuration names)."""
    from asag.build import build_model
    from asag.config import load_config
    from asag.data.synthetic import generate_synthetic
    from asag.engine.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoint")
    generate_synthetic(root / "data", 2, seed=3, val_images=2)
    cfg = load_config("tiny_cpu", [f"data.root={root / 'data'}"])
    torch.manual_seed(0)
    save_checkpoint(root / "ckpt.pth", model=build_model(cfg), optimizer=None, scheduler=None,
                    scaler=None, epoch=0, iteration=0, config=cfg.to_dict(), label_map={})
    return root
