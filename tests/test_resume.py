"""Crash-safe checkpoints and exact resume (l3m_lightning/checkpointing.py; docs/outputs.md).

End to end: a tiny quickstart fit is SIGKILLed right after a checkpoint (``tests/_resume_callbacks``)
and resumed with ``--ckpt_path last``; its final weights, optimiser state and every logged scalar
must equal an uninterrupted run's bit for bit. Kill points: step 6 (mid-epoch; the validation pass
due after step 6 is redone) and step 9 (the epoch's last batch: the next epoch's order is drawn after
it). At step 6 ``last.ckpt`` is also truncated first, so the resume falls back to ``epoch=0-step=6.ckpt``.
Unit tests: the atomic writer under ENOSPC / EACCES, ``--ckpt_path last`` verification, sampler order.
"""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l3m_lightning.checkpointing import (
    FAULT_ENV,
    AtomicCheckpointIO,
    CheckpointReadError,
    CheckpointWriteError,
    ResumableRandomSampler,
    checkpoint_problem,
    recover_interrupted_swaps,
    resolve_last_checkpoint,
    with_atomic_checkpoint_io,
)

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 12
# 38 training rows / batch 4 = 9 batches an epoch; checkpoints and validation every 3 steps
TINY = [
    "--config", str(ROOT / "configs" / "quickstart.yaml"),
    "--trainer.max_steps", str(MAX_STEPS),
    "--trainer.val_check_interval", "3",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--model.policy.config", "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}",
    "--model.sampling.max_new_tokens", "6",
    "--model.sampling.num_samples", "2",
    "--model.value_baseline.enabled", "true",  # its head and its optimiser group resume too
    "--model.export_dir", "",
    "--data.batch_size", "4",
    "--data.embedded_num_prompts", "40",
    "--data.max_val_rows", "4",
]


def _fit(work: Path, *args: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    runs = work / "runs"
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", *TINY,
           "--trainer.logger.init_args.save_dir", str(runs),
           "--trainer.callbacks.init_args.dirpath", str(runs / "ckpt"),
           "--trainer.callbacks.init_args.every_n_train_steps", "3",
           "--trainer.callbacks+=_resume_callbacks.KillAtStep", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    env.pop("L3M_KILL_AT_STEP", None)
    if kill_at is not None:
        env["L3M_KILL_AT_STEP"] = str(kill_at)
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    expected = -signal.SIGKILL if kill_at is not None else 0
    assert proc.returncode == expected, proc.stderr[-4000:]
    return proc


def _scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag) if tag != "hp_metric"}


def _assert_equal_states(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for key in a:
            _assert_equal_states(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_states(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    _fit(work)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, corrupt_last", [(6, True), (9, False)], ids=["mid-epoch+truncated-last", "epoch-end"])
def test_killed_run_resumes_bit_identical(uninterrupted, tmp_path, kill_at, corrupt_last):
    _fit(tmp_path, kill_at=kill_at)
    ckpt_dir = tmp_path / "runs" / "ckpt"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == kill_at
    if corrupt_last:  # as a copy cut short would leave it
        data = (ckpt_dir / "last.ckpt").read_bytes()
        (ckpt_dir / "last.ckpt").write_bytes(data[: len(data) // 2])
    resumed = _fit(tmp_path, "--ckpt_path", "last")
    if corrupt_last:
        assert f"{ckpt_dir / 'last.ckpt'} is truncated" in resumed.stderr
        assert f"resuming from {ckpt_dir / f'epoch=0-step={kill_at}.ckpt'} instead" in resumed.stderr

    final = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    reference = torch.load(uninterrupted / "runs" / "ckpt" / "last.ckpt", weights_only=True)
    assert final["global_step"] == reference["global_step"] == MAX_STEPS
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "l3m"):
        _assert_equal_states(reference[key], final[key], key)

    # every scalar the resumed run logged (its steps, and the validation redone at the kill step) is
    # the uninterrupted run's, and it logged all of those from the kill step on
    runs = tmp_path / "runs" / "quickstart"
    assert sorted(p.name for p in runs.iterdir()) == ["version_0", "version_1"]
    expected, got = _scalars(uninterrupted / "runs" / "quickstart" / "version_0"), _scalars(runs / "version_1")
    assert {k for k in expected if k[1] >= kill_at} <= set(got)
    assert ("train/sft_loss", kill_at - 1) in got  # the killed batch's own row, logged after its checkpoint
    assert any(tag == "train/sft_loss" and step > kill_at for tag, step in got)
    different = {k: (expected.get(k), v) for k, v in got.items() if expected.get(k) != v}
    assert not different, f"{len(different)} of {len(got)} logged values differ, e.g. {sorted(different.items())[:4]}"


# --- writing -------------------------------------------------------------------------------------
def _state(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((256, 256), float(step))}}


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(_state(1), target)
    monkeypatch.setenv(FAULT_ENV, "ENOSPC:4096")  # the disk fills after 4 KiB of the 256 KiB
    with pytest.raises(CheckpointWriteError) as raised:
        io.save_checkpoint(_state(2), target)
    message = str(raised.value)
    assert message == f"could not write checkpoint {target}: No space left on device; the previous last.ckpt is intact"
    assert raised.value.errno == errno.ENOSPC and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind
    assert torch.load(target, weights_only=True)["global_step"] == 1

    monkeypatch.delenv(FAULT_ENV)
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*last.ckpt: Permission denied; the previous last.ckpt is intact"):
        io.save_checkpoint(_state(3), target)
    assert torch.load(target, weights_only=True)["global_step"] == 1


def test_write_is_a_rename_in_the_same_folder(tmp_path, monkeypatch):
    """The temp file lives beside the target (never in TMPDIR), and the target only ever changes by os.replace."""
    monkeypatch.setenv("TMPDIR", "/dev/shm")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((Path(src), Path(dst))), real_replace(src, dst))[1])
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / ".epoch=0-step=3.ckpt.tmp-999999999-deadbeef"  # left by a process killed mid-write
    stale.write_bytes(b"PK")
    AtomicCheckpointIO().save_checkpoint(_state(1), tmp_path / "sub" / "last.ckpt")
    [(src, dst)] = replaced
    assert dst == tmp_path / "sub" / "last.ckpt" and src.parent == dst.parent and src.name.startswith(".last.ckpt.tmp-")
    assert torch.load(dst, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["last.ckpt"]  # the stale temp file is gone


def test_user_checkpoint_io_is_kept():
    from lightning.fabric.plugins import TorchCheckpointIO

    [added] = with_atomic_checkpoint_io(None)
    assert isinstance(added, AtomicCheckpointIO)
    own = TorchCheckpointIO()
    assert with_atomic_checkpoint_io([own]) == [own]
    assert len(with_atomic_checkpoint_io(["bf16-mixed"])) == 2


@pytest.mark.filterwarnings("ignore:.*args parameter is intended.*")
def test_cli_trainer_writes_atomically(tmp_path):
    from l3m_lightning.cli import TokenizerLinkedCLI
    from l3m_lightning.data import ChatDataModule
    from l3m_lightning.module import L3MModule

    cli = TokenizerLinkedCLI(L3MModule, ChatDataModule, run=False, args=[
        "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.logger", "false",
        "--model.policy.config", "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}",
        "--trainer.default_root_dir", str(tmp_path)])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# --- reading: --ckpt_path last -------------------------------------------------------------------
class _Trainer:
    """What resolve_last_checkpoint reads of a trainer."""

    def __init__(self, dirpath: Path) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        self.checkpoint_callbacks = [ModelCheckpoint(dirpath=dirpath, save_last=True)]
        self.callbacks = list(self.checkpoint_callbacks)


@pytest.mark.parametrize("damage", ["empty", "truncated", "not-a-checkpoint", "zeros"])
def test_unreadable_last_falls_back_to_newest_intact(tmp_path, damage):
    io = AtomicCheckpointIO()
    for step in (2, 4):
        io.save_checkpoint(_state(step), tmp_path / f"epoch=0-step={step}.ckpt")
        os.utime(tmp_path / f"epoch=0-step={step}.ckpt", (step, step))  # step 4 is the newer
    last = tmp_path / "last.ckpt"
    io.save_checkpoint(_state(6), last)
    data = last.read_bytes()
    last.write_bytes({"empty": b"", "truncated": data[: len(data) // 3], "not-a-checkpoint": b"hello " * 50,
                      "zeros": bytes(len(data))}[damage])
    assert checkpoint_problem(last) is not None
    with pytest.warns(UserWarning) as warned:
        chosen = resolve_last_checkpoint(_Trainer(tmp_path))
    assert chosen == str(tmp_path / "epoch=0-step=4.ckpt")
    [message] = [str(w.message) for w in warned if "ckpt_path=last" in str(w.message)]
    assert str(last) in message and chosen in message

    for step in (2, 4):  # nothing intact: one clear error
        (tmp_path / f"epoch=0-step={step}.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointReadError, match=r"ckpt_path=last: .*last.ckpt .*, and no other checkpoint in .* loads"):
        resolve_last_checkpoint(_Trainer(tmp_path))


def test_intact_last_is_chosen_and_a_flipped_byte_is_caught(tmp_path):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_state(6), last)
    assert resolve_last_checkpoint(_Trainer(tmp_path)) == str(last)
    assert resolve_last_checkpoint(_Trainer(tmp_path / "none")) is None  # no checkpoint yet: Lightning starts fresh
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: only the CRC check sees it
    last.write_bytes(bytes(data))
    assert "CRC" in checkpoint_problem(last)


def test_last_a_step_behind_a_newer_checkpoint(tmp_path):
    """Killed between the step checkpoint and last.ckpt (written right after it): resume from the step checkpoint."""
    io = AtomicCheckpointIO()
    io.save_checkpoint(_state(4), tmp_path / "last.ckpt")
    io.save_checkpoint(_state(5), tmp_path / "epoch=0-step=5.ckpt")
    with pytest.warns(UserWarning, match=r"last.ckpt is at step 4, but .*step=5.ckpt \(step 5\) was written after it"):
        assert resolve_last_checkpoint(_Trainer(tmp_path)) == str(tmp_path / "epoch=0-step=5.ckpt")


def test_sharded_checkpoint_swap_recovers(tmp_path):
    """A sharded (folder) checkpoint swap cut between its two renames: the complete new copy is put in place."""
    staging, retired = tmp_path / ".last.ckpt.tmp", tmp_path / ".last.ckpt.old"
    for folder, step in ((staging, 6), (retired, 4)):
        folder.mkdir()
        (folder / ".metadata").write_bytes(b"x")
        torch.save({"global_step": step}, folder / "meta.pt")
    recover_interrupted_swaps(tmp_path)
    assert torch.load(tmp_path / "last.ckpt" / "meta.pt")["global_step"] == 6 and checkpoint_problem(tmp_path / "last.ckpt") is None
    (tmp_path / "last.ckpt").rename(tmp_path / "elsewhere")  # cut before the new copy was complete: the old one comes back
    (staging).mkdir()
    recover_interrupted_swaps(tmp_path)
    assert torch.load(tmp_path / "last.ckpt" / "meta.pt")["global_step"] == 4


# --- data order ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*set_vital.*")
def test_sampler_keeps_random_sampler_order_and_resumes_mid_epoch():
    from torch.utils.data import DataLoader
    from torchdata.stateful_dataloader import StatefulDataLoader

    data = list(range(23))

    def epochs(loader, n=3):
        torch.manual_seed(5)
        out = []
        for _ in range(n):
            out.append([b.tolist() for b in loader])
            out.append(torch.rand(1).item())  # and the global stream is left where RandomSampler leaves it
        return out

    plain = epochs(DataLoader(data, batch_size=4, shuffle=True, drop_last=True))
    make = lambda: StatefulDataLoader(data, batch_size=4, sampler=ResumableRandomSampler(data), drop_last=True)  # noqa: E731
    assert epochs(make()) == plain

    torch.manual_seed(5)
    loader = make()
    iterator = iter(loader)
    seen = [next(iterator).tolist() for _ in range(2)]
    state = loader.state_dict()
    torch.rand(3)  # the resumed process's stream is elsewhere: the order must not depend on it
    resumed = make()
    resumed.load_state_dict(state)
    assert seen + [b.tolist() for b in resumed] == plain[0]


def _as_pre_issue_13(checkpoint: dict) -> dict:
    """A checkpoint as the code before the option groups wrote it: flat hyperparameters, the value head on the module."""
    from l3m_lightning.options import MOVED_KEYS

    flat = {}
    for key, value in checkpoint["hyper_parameters"].items():
        if isinstance(value, dict) and key not in ("constraints", "_instantiator"):
            for field, v in value.items():
                flat_key = next((old for old, new in MOVED_KEYS.items() if new == f"{key}.{field}"), None)
                if flat_key is not None:  # None: an option added after the groups, which old checkpoints lack
                    flat[flat_key] = v
        else:
            flat[key] = value
    checkpoint["hyper_parameters"] = flat
    checkpoint["state_dict"] = {k.removeprefix("objective."): v for k, v in checkpoint["state_dict"].items()}
    return checkpoint


@pytest.mark.slow
def test_fit_resumes_a_checkpoint_written_before_the_option_groups(uninterrupted, tmp_path):
    """``fit --ckpt_path`` re-parses the checkpoint's hyperparameters (LightningCLI); old flat ones are upgraded, not refused."""
    _fit(tmp_path / "killed", kill_at=6)
    checkpoint = torch.load(tmp_path / "killed" / "runs" / "ckpt" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 6
    old = _as_pre_issue_13(checkpoint)
    assert "mu_floor" in old["hyper_parameters"] and any(k.startswith("value_head.") for k in old["state_dict"])
    torch.save(old, tmp_path / "old.ckpt")
    _fit(tmp_path / "work", "--ckpt_path", str(tmp_path / "old.ckpt"))
    resumed = torch.load(tmp_path / "work" / "runs" / "ckpt" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == MAX_STEPS
    final = torch.load(uninterrupted / "runs" / "ckpt" / "last.ckpt", weights_only=False)
    _assert_equal_states(resumed["state_dict"], final["state_dict"], "state_dict")  # the same run, bit for bit
