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
