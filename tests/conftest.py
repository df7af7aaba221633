import signal
from pathlib import Path

import pytest
import torch
from tests.official import FIXTURES_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    path = FIXTURES_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"official reference fixtures not found: {path}")
    return path


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield


class _UnchangedAllocator:
    """Stands in for glibc in the test process: accepts ``mallopt`` / ``malloc_trim`` and changes nothing."""

    def mallopt(self, param: int, value: int) -> int:
        return 1

    def malloc_trim(self, pad: int) -> int:
        return 0


@pytest.fixture(autouse=True, scope="session")
def _test_process_allocator():
    """The commands under test apply ``runtime.host_memory``; the test process itself keeps the C
    allocator as it is (process-wide state would outlive the test that set it). Tests of the real
    allocator run in subprocesses (tests/engine/test_host_memory.py)."""
    from asag.engine import host_memory

    patch = pytest.MonkeyPatch()
    patch.setattr(host_memory, "glibc", lambda: _UnchangedAllocator())
    yield
    patch.undo()


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


@pytest.fixture
def sigint_handler():
    """Install a SIGINT handler for one test (pytest may run with SIGINT ignored, e.g. in the
    background of a non-interactive shell); the one before is restored afterwards."""
    before = signal.getsignal(signal.SIGINT)

    def install(handler):
        signal.signal(signal.SIGINT, handler)
        return handler

    yield install
    signal.signal(signal.SIGINT, before)
