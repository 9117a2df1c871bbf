"""Crash-safe checkpoints and exact resume.

* ``AtomicCheckpointIO`` writes every checkpoint to a temp file beside its target, fsyncs it and
  ``os.replace``-s it in: a kill or a full disk leaves the previous file whole, never half a file.
  (Lightning's own writer stages the file in ``TMPDIR`` and *moves* it, which is a copy when
  ``TMPDIR`` is on another filesystem: ``kill -9`` mid-copy left a 0-byte ``last.ckpt``.)
* ``atomic_sharded_saves`` does the same for sharded FSDP / FSDP2 checkpoints (folders): written
  beside the target, then swapped in.
* ``resolve_last_checkpoint`` is ``--ckpt_path last`` with a check: an unreadable ``last.ckpt``
  falls back to the newest intact checkpoint beside it, with a warning naming both.
* ``ResumableRandomSampler`` + torchdata's ``StatefulDataLoader`` (data.py) restore the data order
  mid-epoch, and ``ExactResume`` restores each rank's RNG states at the point the uninterrupted run
  would have them, so a killed-and-resumed CPU run is bit-identical to one never interrupted.
"""

from __future__ import annotations

import errno as errno_codes
import os
import random
import re
import secrets
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

#: Fault injection (bench/fault_injection.py, tests): "ENOSPC:<bytes>" makes a checkpoint write fail
#: with ENOSPC after that many bytes, as a full disk would. Read on every write; unset in real runs.
FAULT_ENV = "L3M_CHECKPOINT_FAULT"


try:  # the CLI prints a ConfigError as one line (l3m_lightning.errors)
    from constraints.base import ConfigError
except ImportError:  # pragma: no cover
    ConfigError = ValueError  # type: ignore[misc,assignment]


class CheckpointWriteError(OSError, ConfigError):
    """A checkpoint could not be written (full disk, no permission); the file it was to replace is untouched.

    An ``OSError`` (it is one) and a ``ConfigError``: the remedy is in the environment, not the code,
    so the command line prints it as one line.
    """


class CheckpointReadError(ConfigError):
    """``--ckpt_path last`` found no checkpoint it could load."""


# --- writing ------------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    """fsync a file, or a directory to make a rename in it durable (the entry lives in the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) do not fsync directories; the rename still happened
        pass
    finally:
        os.close(fd)


class _FaultyFile:
    """A file object that fails with ENOSPC once ``limit`` bytes are written (``FAULT_ENV``)."""

    def __init__(self, file: Any, limit: int) -> None:
        self._file, self._left = file, limit

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if size > self._left:
            self._file.write(bytes(memoryview(data).cast("B")[: self._left]))
            self._left = 0
            raise OSError(errno_codes.ENOSPC, os.strerror(errno_codes.ENOSPC))
        self._left -= size
        return self._file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


def _remove_stale_temp_files(folder: Path) -> None:
    """Temp files left in ``folder`` by a process killed mid-write (its pid is gone)."""
    for stale in folder.glob(".*.tmp-*"):
        match = _TEMP_NAME.match(stale.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)  # still running (or not ours to judge): leave it
        except ProcessLookupError:
            stale.unlink(missing_ok=True)
        except OSError:
            pass


def write_atomically(path: _PATH, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    Same directory, so ``os.replace`` is atomic: a reader (or a resume after a crash) sees the old
    file or the new one. Any ``OSError`` (ENOSPC, EACCES, ...) removes the temp file and becomes
    one ``CheckpointWriteError`` line naming the file and saying the previous one is intact.
    """
    target = Path(path)
    had_previous = target.exists()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    fault = os.environ.get(FAULT_ENV, "")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(target.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, like open()
        with os.fdopen(fd, "wb") as file:
            write(_FaultyFile(file, int(fault.split(":", 1)[1])) if fault.startswith("ENOSPC:") else file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, target)
    except BaseException as err:  # no temp file left behind, whatever happened
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        cause = _os_error_in(err)
        if cause is None:  # KeyboardInterrupt, a pickling error, ...: not a write failure
            raise
        previous = (f"the previous {target.name} is intact" if had_previous
                    else f"nothing was replaced, the checkpoints already in {target.parent} are intact")
        reason = cause.strerror or str(cause) or type(cause).__name__
        raised = CheckpointWriteError(f"could not write checkpoint {target}: {reason}; {previous}")
        raised.errno = cause.errno
        raise raised from None
    _fsync(target.parent)


def _os_error_in(err: BaseException) -> OSError | None:
    """The ``OSError`` behind ``err``: torch's zip writer turns a failed ``write`` into its own RuntimeError."""
    for _ in range(10):
        if isinstance(err, OSError):
            return err
        if not isinstance(err, Exception) or (err.__cause__ or err.__context__) is None:
            return None
        err = err.__cause__ or err.__context__
    return None


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose writes are atomic and durable on local disks (see ``write_atomically``).

    Remote paths (``s3://...``) keep Lightning's fsspec transaction. Sharded FSDP checkpoints
    (folders) do not go through a ``CheckpointIO``: ``atomic_sharded_saves`` covers those.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = str(path).removeprefix("file://")
        write_atomically(path, lambda file: torch.save(checkpoint, file))


def with_atomic_checkpoint_io(plugins: Any, strategy: Any = None) -> list[Any]:
    """``plugins`` plus an ``AtomicCheckpointIO``, unless the config already has a ``CheckpointIO``
    (in ``plugins`` or set on a strategy instance): the user's choice wins."""
    if plugins is None:
        plugins = []
    elif not isinstance(plugins, (list, tuple)):
        plugins = [plugins]
    if any(isinstance(p, CheckpointIO) for p in plugins) or getattr(strategy, "_checkpoint_io", None) is not None:
        return list(plugins)
    return [*plugins, AtomicCheckpointIO()]


# --- sharded checkpoints (folders) --------------------------------------------------------------
def _staging(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp")


def _retired(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _complete_sharded(folder: Path) -> bool:
    """A distributed checkpoint folder whose save finished: DCP writes ``.metadata`` last, Lightning then ``meta.pt``."""
    return (folder / ".metadata").is_file() and (folder / "meta.pt").is_file()


def _swap_in(staging: Path, target: Path) -> None:
    """Replace ``target`` (file or folder) by the folder ``staging``: two renames; ``recover_interrupted_swaps`` finishes
    the job if a crash falls between them (a folder cannot be renamed over a non-empty one in one step)."""
    retired = _retired(target)
    if target.exists() or target.is_symlink():
        _remove(retired)
        os.replace(target, retired)
    os.replace(staging, target)
    _fsync(target.parent)
    _remove(retired)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_interrupted_swaps(folder: _PATH) -> None:
    """A sharded checkpoint whose swap was cut between its two renames: put the newest complete copy in place."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for leftover in list(folder.glob(".*.ckpt.tmp")) + list(folder.glob(".*.ckpt.old")):
        target = folder / leftover.name[1:-4]
        if target.exists() or target.is_symlink():
            continue
        staging, retired = _staging(target), _retired(target)
        if staging.is_dir() and _complete_sharded(staging):
            os.replace(staging, target)
        elif retired.exists():
            os.replace(retired, target)
        _fsync(folder)


def atomic_sharded_saves(strategy: Any) -> None:
    """Make a strategy's sharded checkpoints (folders: ``FSDPStrategy(state_dict_type="sharded")``,
    ``ModelParallelStrategy``) as crash-safe as files: every rank writes into ``.<name>.tmp`` beside
    the target, then rank 0 fsyncs Lightning's ``meta.pt`` and swaps the folder in.

    These saves bypass the ``CheckpointIO`` (each rank writes its own shards with
    ``torch.distributed.checkpoint``, which fsyncs them), so the strategy's ``save_checkpoint`` is
    wrapped on this instance. Without it a kill mid-save left the target folder half old, half new.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if not isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or getattr(strategy.save_checkpoint, "_l3m_atomic", False):
        return
    original = strategy.save_checkpoint

    def save_checkpoint(checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if isinstance(strategy, FSDPStrategy):
            sharded = strategy._state_dict_type == "sharded"
        else:
            sharded = bool(strategy._save_distributed_checkpoint)
        if not sharded or storage_options is not None or not _is_local(filepath):
            return original(checkpoint, filepath, storage_options)
        target = Path(strategy.broadcast(str(filepath)))
        staging = _staging(target)
        if strategy.is_global_zero:
            recover_interrupted_swaps(target.parent)
            _remove(staging)  # a save cut short earlier
        strategy.barrier("l3m_sharded_save_start")
        try:
            original(checkpoint, staging, None)
            strategy.barrier("l3m_sharded_save_written")  # every rank's shards are on disk
            if strategy.is_global_zero:
                for name in ("meta.pt", ".metadata"):
                    _fsync(staging / name)
                _fsync(staging)
                _swap_in(staging, target)
        except OSError as err:
            if strategy.is_global_zero:
                _remove(staging)
            previous = (f"the previous {target.name} is intact" if target.exists()
                        else f"nothing was replaced, the checkpoints already in {target.parent} are intact")
            raise CheckpointWriteError(f"could not write checkpoint {target}: {err.strerror or err}; {previous}") from None
        strategy.barrier("l3m_sharded_save_done")

    save_checkpoint._l3m_atomic = True  # type: ignore[attr-defined]
    strategy.save_checkpoint = save_checkpoint


# --- reading ------------------------------------------------------------------------------------
def checkpoint_problem(path: _PATH, check_crc: bool = True) -> str | None:
    """``None`` if ``path`` is a loadable checkpoint, else why not, as a short phrase.

    A file: the zip structure (a truncated file has no central directory, or members that run past
    its end), the CRC of every member (``check_crc``; one sequential read, which also warms the
    page cache for the load that follows), and ``torch.load(mmap=True)``, which unpickles the
    state without reading the tensor data. A folder (a sharded checkpoint): its metadata files load.
    """
    return _inspect(Path(path), check_crc)[0]


def _inspect(p: Path, check_crc: bool = True) -> tuple[str | None, int | None]:
    """(``checkpoint_problem``, the checkpoint's ``global_step`` if it loads)."""
    if p.is_dir():
        if not (p / ".metadata").is_file():
            return "is a folder without a distributed-checkpoint .metadata file", None
        return _inspect_file(p / "meta.pt", check_crc) if (p / "meta.pt").exists() else (None, None)
    if not p.exists():
        return "does not exist", None
    return _inspect_file(p, check_crc)


def _inspect_file(p: Path, check_crc: bool) -> tuple[str | None, int | None]:
    size = p.stat().st_size
    if size == 0:
        return "is empty (0 bytes)", None
    with p.open("rb") as f:
        head = f.read(4096)
    mmap = head.startswith(b"PK\x03\x04")  # torch.save's zip format; anything else is the legacy format or junk
    if mmap:
        try:
            with zipfile.ZipFile(p) as archive:
                for info in archive.infolist():
                    if info.header_offset + info.compress_size > size:
                        return f"is truncated ({size} bytes; member {info.filename} runs past the end)", None
                bad = archive.testzip() if check_crc else None
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            return f"is truncated or corrupt ({size} bytes; no readable zip directory: {err})", None
        if bad is not None:
            return f"is corrupt (CRC mismatch in {bad})", None
    elif not head.strip(b"\0"):
        return f"holds only zero bytes at its start ({size} bytes)", None
    try:
        loaded = torch.load(p, map_location="cpu", mmap=mmap, weights_only=False)
    except Exception as err:  # UnpicklingError, EOFError, RuntimeError from the zip reader, ...
        message = " ".join(str(err).split())[:160] or type(err).__name__
        return f"cannot be loaded ({type(err).__name__}: {message})", None
    if not isinstance(loaded, dict):
        return f"does not hold a checkpoint dict (found {type(loaded).__name__})", None
    step = loaded.get("global_step")
    return None, int(step) if isinstance(step, int) else None


def _last_candidates(trainer: L.Trainer) -> set[str]:
    """The files ``ckpt_path="last"`` chooses from: every ``ModelCheckpoint``'s ``last*.ckpt`` (as Lightning does)."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    found = {cb.ckpt_path for cb in trainer.callbacks if isinstance(cb, OnExceptionCheckpoint)}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found |= set(callback._find_last_checkpoints(trainer))
    return {str(p) for p in found if p and _is_local(p) and os.path.exists(p)}


def resolve_last_checkpoint(trainer: L.Trainer) -> str | None:
    """The checkpoint ``ckpt_path="last"`` should load: the newest ``last.ckpt`` if it loads (or a checkpoint
    beside it written later, at a later step), else the newest intact checkpoint in its folder (warning,
    naming both), else ``CheckpointReadError``.

    ``None`` when there is no local last checkpoint at all (Lightning then warns and starts fresh).
    """
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath and _is_local(callback.dirpath):
            recover_interrupted_swaps(callback.dirpath)
    candidates = _last_candidates(trainer)
    if not candidates:
        return None
    last = max(candidates, key=os.path.getmtime)
    problem, last_step = _inspect(Path(last))
    folder = Path(last).parent
    siblings = sorted((p for p in folder.glob("*.ckpt") if str(p) != last and not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    if problem is None:
        # a kill between the step checkpoint and last.ckpt (written right after it) leaves last.ckpt a step behind
        for newer in (p for p in siblings if p.stat().st_mtime > os.path.getmtime(last)):
            newer_problem, step = _inspect(newer)
            if newer_problem is None and step is not None and last_step is not None and step > last_step:
                rank_zero_warn(f"ckpt_path=last: {last} is at step {last_step}, but {newer} (step {step}) was "
                               f"written after it; resuming from {newer}")
                return str(newer)
        return last
    for other in siblings:
        if _inspect(other)[0] is None:
            rank_zero_warn(f"ckpt_path=last: {last} {problem}; resuming from {other} instead, the newest intact "
                           f"checkpoint beside it (training since that checkpoint is repeated)")
            return str(other)
    raise CheckpointReadError(f"ckpt_path=last: {last} {problem}, and no other checkpoint in {folder} loads; "
                              "pass --ckpt_path <file> or start without --ckpt_path")


# --- exact resume -------------------------------------------------------------------------------
class _EpochPermutation:
    """One epoch of ``torch.utils.data.RandomSampler``'s order, with its seed and position as state."""

    def __init__(self, size: int) -> None:
        self.size, self.seed, self.yielded, self._order = size, None, 0, None

    def __iter__(self) -> "_EpochPermutation":
        return self

    def draw_order(self) -> None:
        """Draw the epoch's seed (from the global stream, as RandomSampler does at its first index) and order."""
        if self._order is None:
            if self.seed is None:
                self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator()
            generator.manual_seed(self.seed)
            self._order = torch.randperm(self.size, generator=generator).tolist()

    def __next__(self) -> int:
        self.draw_order()
        if self.yielded >= self.size:
            raise StopIteration
        self.yielded += 1
        return self._order[self.yielded - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.yielded, self._order = state["seed"], state["yielded"], None


class ResumableRandomSampler(torch.utils.data.RandomSampler):
    """``RandomSampler``'s exact order (each epoch's seed drawn from the global torch RNG), resumable mid-epoch.

    torchdata's own ``RandomSampler`` draws one seed when the loader is built, which would reorder
    every run's data; this keeps the order runs had before, and its iterator's state (the epoch's
    seed, indices served) is what ``StatefulDataLoader`` saves. A ``RandomSampler`` subclass, so
    Lightning still swaps in a ``DistributedSampler`` under DDP.
    """

    def __init__(self, data_source: Any) -> None:
        super().__init__(data_source)

    def __iter__(self) -> _EpochPermutation:  # type: ignore[override]
        return _EpochPermutation(len(self.data_source))


def _rng_states() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values: checkpoints load with ``weights_only=True``."""
    import numpy as np

    name, key, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ExactResume(L.Callback):
    """Puts every rank's RNG streams (and the data iterator) back where the uninterrupted run had them.

    Saved: each rank's torch / CUDA / numpy / ``random`` states (gathered to the checkpoint), and
    whether the checkpoint was written before a validation pass that the run then did (Lightning
    skips that pass on resume) or at the end of an epoch (the next epoch's order is drawn after it).
    Restored in ``on_train_start``, after the sanity check and ``on_fit_start``'s per-rank seeding,
    right before the first batch: the checkpointed batch's own metrics (logged by Lightning only after
    the save), RNG states, then that validation pass again (it draws samples; its metrics are logged
    again at the same step), then a fresh iterator for the next epoch if due. Uses Lightning 2.6 loop
    internals (``fit_loop._data_fetcher``, ``epoch_loop._should_check_val_fx``): tests/test_resume.py
    is what tells when a Lightning upgrade breaks them.
    """

    KEY = "l3m_exact_resume"

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._loader_states: list[dict[str, Any]] | None = None
        self._rng_at_first_batch: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        states = _rng_states()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states)  # every rank is in dump_checkpoint
        else:
            gathered = [states]
        position = self._position(trainer)
        checkpoint[self.KEY] = {"rng": gathered, **position, "batch_log": self._batch_log(trainer, position)}

    @staticmethod
    def _batch_log(trainer: L.Trainer, position: dict[str, Any]) -> dict[str, Any] | None:
        """This batch's logged scalars, when the checkpoint is written in its ``on_train_batch_end``: Lightning
        sends them to the loggers only after that hook, and the resumed run starts with the next batch, so
        a kill in between would lose them. Restored runs log them (again: same step, same values)."""
        connector = trainer._logger_connector
        if not position.get("in_batch_end") or not trainer.loggers or trainer.fit_loop._should_accumulate():
            return None
        if not connector.should_update_logs:
            return None
        from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars

        metrics = convert_tensors_to_scalars(trainer.fit_loop.epoch_loop._results.metrics(True)["log"])
        return {"metrics": metrics, "step": trainer.fit_loop.epoch_loop._batches_that_stepped, "epoch": trainer.current_epoch}

    @staticmethod
    def _position(trainer: L.Trainer) -> dict[str, Any]:
        """Where in the loop the checkpoint is written: inside ``on_train_batch_end`` (before this
        batch's validation, if any), and whether the epoch's batches are all done."""
        if not trainer.training:  # e.g. ModelCheckpoint in on_validation_end: after the pass, nothing to redo
            return {"in_batch_end": False, "validation_due": False, "epoch_end": False, "epoch": trainer.current_epoch}
        loop = trainer.fit_loop.epoch_loop
        progress = loop.batch_progress
        in_batch_end = progress.total.completed == progress.total.processed - 1
        fetcher = trainer.fit_loop._data_fetcher
        validation_due = bool(in_batch_end and fetcher is not None and not loop._skip_next_val
                              and loop._should_check_val_fx(fetcher))
        done = progress.current.completed + int(in_batch_end)
        epoch_end = bool(progress.is_last_batch or done >= trainer.num_training_batches)
        return {"in_batch_end": in_batch_end, "validation_due": validation_due, "epoch_end": epoch_end,
                "epoch": trainer.current_epoch}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(self.KEY)
        if state is None:
            rank_zero_warn("this checkpoint holds no RNG states (written before exact resume existed): "
                           "the run continues, but not bit-identically to an uninterrupted one")
            return
        if len(state["rng"]) != trainer.world_size:
            rank_zero_warn(f"the checkpoint holds RNG states of {len(state['rng'])} ranks, this run has "
                           f"{trainer.world_size}: sampling continues from fresh streams, not the saved ones")
            state = {**state, "rng": None}
        self._pending = state
        self._loader_states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        fit_loop = trainer.fit_loop
        if not pending["epoch_end"] and self._loader_states and fit_loop._data_fetcher is not None:
            # the iterator Lightning built before restoring the loop: rebuild it from the saved state
            # with the sampler's epoch set (a DistributedSampler orders by epoch at iter() time)
            _set_sampler_epochs(fit_loop, fit_loop.epoch_progress.current.processed)
            fit_loop._combined_loader._load_state_dicts(self._loader_states)
            iter(fit_loop._data_fetcher)
        self._loader_states = None
        if pending.get("batch_log") and trainer.is_global_zero:
            log = pending["batch_log"]
            for logger in trainer.loggers:
                logger.log_metrics({**log["metrics"], "epoch": log["epoch"]}, step=log["step"])
                logger.save()
        if pending["rng"] is not None:
            _set_rng_states(pending["rng"][trainer.global_rank])
        if pending["validation_due"]:
            _run_validation(trainer, pending.get("epoch"))
        if pending["epoch_end"] and fit_loop._data_fetcher is not None:
            _set_sampler_epochs(fit_loop, fit_loop.epoch_progress.current.processed)
            iter(fit_loop._data_fetcher)  # the next epoch's order, drawn from the restored stream
            _draw_epoch_orders(fit_loop)  # now, not at the first fetch: Lightning draws in between
        # Between here and the first batch the uninterrupted run draws nothing, but Lightning's resume
        # path does (it builds a validation iterator to skip the pass run above): undo that there.
        self._rng_at_first_batch = _rng_states()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._rng_at_first_batch is not None:
            _set_rng_states(self._rng_at_first_batch)
            self._rng_at_first_batch = None


def _draw_epoch_orders(fit_loop: Any) -> None:
    """Make each ``ResumableRandomSampler`` iterator just built draw its epoch seed now."""
    for loader in fit_loop._combined_loader.flattened:
        batches = getattr(getattr(loader, "_iterator", None), "_sampler_iter", None)  # torchdata's batch-sampler iterator
        order = getattr(batches, "sampler_iter", None)
        if isinstance(order, _EpochPermutation):
            order.draw_order()


def _set_sampler_epochs(fit_loop: Any, epoch: int) -> None:
    from lightning.fabric.utilities.data import _set_sampler_epoch

    for loader in fit_loop._combined_loader.flattened:
        _set_sampler_epoch(loader, epoch)


def _run_validation(trainer: L.Trainer, epoch: int | None) -> None:
    """The validation pass the epoch loop runs after a batch (``_TrainingEpochLoop.on_advance_end``),
    logged under the epoch it had then (after an epoch-end checkpoint Lightning already counts the next)."""
    epoch_loop, progress = trainer.fit_loop.epoch_loop, trainer.fit_loop.epoch_progress.current
    resumed_epoch = progress.completed
    if epoch is not None:
        progress.completed = epoch
    epoch_loop.val_loop.restarting = False
    trainer.validating = True
    first_loop_iter = trainer._logger_connector._first_loop_iter
    trainer.lightning_module.on_validation_model_zero_grad()
    try:
        epoch_loop.val_loop.run()
    finally:
        progress.completed = resumed_epoch
    trainer.training = True
    trainer._logger_connector._first_loop_iter = first_loop_iter
