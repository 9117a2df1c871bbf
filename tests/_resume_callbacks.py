"""Test-only callback for test_resume.py and bench/fault_injection.py (imported by the CLI subprocess).

``KillAtStep`` SIGKILLs its own process at the start of the first batch after global step
``L3M_KILL_AT_STEP``: after that step's checkpoint and validation, before anything else happens — a
crash with nothing flushed, no ``finally`` run, exactly what ``kill -9`` does. ``SaveFaults`` journals
progress and completed saves and can SIGKILL the process in the middle of a checkpoint write.
"""

from __future__ import annotations

import os
import signal

import lightning as L

KILL_ENV = "L3M_KILL_AT_STEP"


class KillAtStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = os.environ.get(KILL_ENV)
        if step and trainer.global_step == int(step):
            os.kill(os.getpid(), signal.SIGKILL)


SAVE_FAULT_ENV = "L3M_KILL_DURING_SAVE"  # "<k>:<bytes>": SIGKILL after <bytes> bytes of this process's k-th checkpoint write
JOURNAL_ENV = "L3M_JOURNAL"  # a file: "step <n>" after every batch, "saved <n> <path>" after every completed save


def _journal(line: str) -> None:
    path = os.environ.get(JOURNAL_ENV)
    if path:  # O_APPEND + os.write: in the page cache at once, so a SIGKILL right after loses nothing
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


class SaveFaults(L.Callback):
    """For bench/fault_injection.py: a journal of progress and completed saves, and a kill in mid-write."""

    def setup(self, trainer, pl_module, stage) -> None:
        io = trainer.strategy.checkpoint_io
        if getattr(io, "_l3m_faults", False):
            return
        save, calls = io.save_checkpoint, [0]
        kill_at, _, limit = os.environ.get(SAVE_FAULT_ENV, "0:0").partition(":")

        def save_checkpoint(checkpoint, path, storage_options=None):
            calls[0] += 1
            if calls[0] == int(kill_at):
                import torch

                real_save = torch.save

                def killing_save(obj, f, *args, **kwargs):
                    return real_save(obj, _KillAfter(f, int(limit)), *args, **kwargs)

                torch.save = killing_save
            save(checkpoint, path, storage_options)
            _journal(f"saved {checkpoint['global_step']} {path}")

        io.save_checkpoint, io._l3m_faults = save_checkpoint, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _journal(f"step {trainer.global_step}")


class _KillAfter:
    def __init__(self, file, limit: int) -> None:
        self._file, self._left = file, limit

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size >= self._left:
            self._file.write(bytes(memoryview(data).cast("B")[: self._left]))
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self._left -= size
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)
