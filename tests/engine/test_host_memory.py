"""runtime.host_memory: the allocator controls it sets, when, and that it changes no number."""

import subprocess
import sys
import textwrap

import pytest
import torch

from asag.cli import main
from asag.config import load_config
from asag.data.synthetic import generate_synthetic
from asag.engine import host_memory
from asag.engine.host_memory import M_MMAP_MAX, M_TRIM_THRESHOLD, HostMemoryChoice, configure_host_memory
from asag.errors import ConfigError

needs_glibc = pytest.mark.skipif(host_memory.glibc() is None, reason="the allocator controls are glibc's")


class FakeLibc:
    """Records mallopt / malloc_trim calls instead of changing this test process's allocator."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(host_memory, "glibc", lambda: fake)
    return fake


def test_reuse_keeps_freed_memory_in_the_heap(libc):
    choice = configure_host_memory("reuse", "cpu")
    assert choice == HostMemoryChoice("reuse", True, "glibc: heap only, never trimmed")
    # no mmapped blocks at all, and a trim threshold that glibc reads as SIZE_MAX
    assert libc.calls == [("mallopt", M_MMAP_MAX, 0), ("mallopt", M_TRIM_THRESHOLD, -1)]
    assert choice.line() == ("runtime.host_memory=reuse: freed CPU memory kept for reuse "
                             "(glibc: heap only, never trimmed)")


@pytest.mark.parametrize("device, kept", [("cpu", True), ("cuda", False), ("cuda:1", False)])
def test_auto_keeps_freed_memory_only_for_cpu_runs(libc, device, kept):
    choice = configure_host_memory("auto", device)
    assert choice.kept is kept
    assert bool(libc.calls) is kept
    if not kept:
        assert choice.line() == ("runtime.host_memory=auto: system allocator unchanged "
                                 "(tensors live on cuda)")


def test_system_leaves_the_allocator_alone(libc):
    assert configure_host_memory("system", "cpu") == HostMemoryChoice("system", False, "as asked")
    assert libc.calls == []


def test_without_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(host_memory, "glibc", lambda: None)
    for choice in ("auto", "reuse"):
        result = configure_host_memory(choice, "cpu")
        assert not result.kept and result.reason == "the C library is not glibc"
    assert not host_memory.keep_freed_memory()


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="runtime.host_memory must be auto, reuse or system, not 'keep'"):
        configure_host_memory("keep", "cpu")
    with pytest.raises(ConfigError, match="runtime.host_memory"):
        load_config("tiny_cpu", ["runtime.host_memory=keep"])
    assert load_config("tiny_cpu").runtime.host_memory == "auto"


RESIDENT_AFTER_FREE = textwrap.dedent("""
    import sys, torch
    from asag.engine.host_memory import keep_freed_memory
    if sys.argv[1] == "reuse":
        assert keep_freed_memory()
    def resident_mib():
        return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
    before = resident_mib()
    x = torch.ones(64 * 2**20)  # 256 MiB, far above any mmap threshold
    peak = resident_mib()
    del x
    print(before, peak, resident_mib())
""")


@needs_glibc
def test_kept_memory_stays_resident_after_free_and_system_memory_does_not():
    """The real allocator in a fresh process: a freed 256 MiB tensor goes back to the kernel by default
    and stays in the process with reuse (so its pages need no fault when reused)."""
    def run(choice):
        out = subprocess.run([sys.executable, "-c", RESIDENT_AFTER_FREE, choice], capture_output=True,
                             text=True, check=True).stdout
        return [int(v) for v in out.split()]

    before, peak, after = run("system")
    assert peak - before >= 250 and after - before < 50
    before, peak, after = run("reuse")
    assert peak - before >= 250 and after - before >= 250


STEP_BITS = textwrap.dedent("""
    import sys, torch
    from asag.build import build_trainer
    from asag.config import load_config
    from asag.engine.host_memory import keep_freed_memory
    from asag.structures import ImageTargets
    if sys.argv[1] == "reuse":
        assert keep_freed_memory()
        # leave freed, non-zero memory behind, so that a read of uninitialised memory would show
        garbage = [torch.full((2**20 * k,), float("nan")) for k in (1, 4, 16)]
        del garbage
    torch.manual_seed(0)
    trainer = build_trainer(load_config("tiny_cpu"))
    images = torch.rand(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[96, 128], [80, 112]])
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.3, 0.6, 0.2, 0.2]])
    targets = [ImageTargets(boxes, torch.tensor([0, 1]), i, tuple(s), tuple(s))
               for i, s in enumerate(sizes.tolist())]
    for _ in range(2):
        result = trainer.train_step(images, sizes, targets, epoch=1)
        print(result.total.item().hex(), result.grad_norm.item().hex())
    print(sum(p.double().sum() for p in trainer.model.parameters()).item().hex())
""")


@needs_glibc
def test_training_steps_are_bit_identical_with_kept_memory():
    """Only where memory comes from changes: two steps of tiny_cpu give the same bits with freed memory
    kept (and NaN-filled garbage left in it) as with the system allocator."""
    def run(choice):
        return subprocess.run([sys.executable, "-c", STEP_BITS, choice], capture_output=True, text=True,
                              check=True).stdout

    kept, system = run("reuse"), run("system")
    assert kept == system and len(system.splitlines()) == 3


def test_train_applies_and_reports_the_choice(tmp_path, capsys, monkeypatch):
    import asag.commands.train as train_command

    seen = []

    def fake(choice, device):
        seen.append((choice, torch.device(device).type))
        return HostMemoryChoice(choice, False, "as asked")

    monkeypatch.setattr(train_command, "configure_host_memory", fake)
    generate_synthetic(tmp_path / "data", 4, seed=3, val_images=2)
    args = [f"data.root={tmp_path / 'data'}", f"runtime.output_dir={tmp_path / 'run'}", "schedule.epochs=1",
            "schedule.max_iters_per_epoch=1", "runtime.eval_every=0", "runtime.host_memory=system"]
    assert main(["train", "tiny_cpu", *args]) == 0
    assert seen == [("system", "cpu")]
    assert "runtime.host_memory=system: system allocator unchanged (as asked)" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["predict", "eval", "benchmark"])
def test_inference_commands_apply_host_memory(command, tiny_checkpoint, tmp_path, monkeypatch):
    """--host-memory of asag predict / eval / benchmark reaches the allocator controls with the device."""
    import importlib

    module = importlib.import_module(f"asag.commands.{command}")
    seen = []
    monkeypatch.setattr(module, "configure_host_memory",
                        lambda choice, device: seen.append((choice, torch.device(device).type))
                        or HostMemoryChoice(choice, False, "as asked"))
    ckpt = str(tiny_checkpoint / "ckpt.pth")
    images = sorted((tiny_checkpoint / "data" / "images" / "val").glob("*.png"))
    argv = {"predict": ["predict", ckpt, str(images[0]), "--out", str(tmp_path / "p")],
            "eval": ["eval", ckpt, "--out", str(tmp_path / "e"), "--no-plots"],
            "benchmark": ["benchmark", ckpt, "--size", "96x128", "--warmup", "0", "--repeats", "1",
                          "--no-flops"]}[command]
    assert main([*argv, "--device", "cpu", "--host-memory", "reuse"]) == 0
    assert seen == [("reuse", "cpu")]


MEMORY_PROBE = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)  # every page fault on this thread: the kernel's RSS count is then exact
    from asag.engine.benchmark import MemoryProbe
    from asag.engine.host_memory import keep_freed_memory
    assert keep_freed_memory()
    x = torch.ones(128 * 2**20)  # 512 MiB, kept by the process once freed
    del x
    probe = MemoryProbe(torch.device("cpu"))
    probe.start()
    y = torch.ones(64 * 2**20)
    print(probe.stop() // 2**20, probe.kind)
""")


@needs_glibc
def test_memory_probe_counts_growth_that_kept_memory_would_hide():
    """asag benchmark's CPU peak memory: a 256 MiB tensor placed in memory kept from earlier work (a
    freed 512 MiB one) still counts."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True)
    growth, kind = out.stdout.split()
    if kind == "cpu_peak_rss_growth":  # the peak could be reset (Linux): the growth is exact
        assert int(growth) >= 200  # without the probe's trim: about 0
