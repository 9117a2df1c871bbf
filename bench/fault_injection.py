"""Kill a training run again and again, resume it each time, and check nothing is lost and nothing changes.

    OMP_NUM_THREADS=1 python bench/fault_injection.py            # 12 kills + a full disk, ~2.5 min on 2 CPU cores
    python bench/fault_injection.py --kills 20 --seed 1

A tiny embedded quickstart fit (checkpoint every step, so saves are frequent; validation every 5
steps; 9 batches an epoch) is run once uninterrupted for reference. Then the same fit is SIGKILLed at
``--kills`` seeded random moments, each run resumed with ``--ckpt_path last``:

* ``time``: the parent sends SIGKILL a random 0–0.25 s (a few steps) after the run's first step (a step, a save, validation, anything);
* ``write``: the run SIGKILLs itself after a random number of bytes of one of its checkpoint writes
  (``last.ckpt`` or a step file) — the case that left a 0-byte ``last.ckpt`` before;
* ``step``: right after a random step's checkpoint and validation.

``TMPDIR`` is on another filesystem than the checkpoints (``/dev/shm``). The checkpoint folder is a
tmpfs of its own when ``mount -t tmpfs`` works (root); once during the sequence it is remounted
too small, so a save fails with a real ENOSPC, then grown back ("full disk"). Without mount rights the
ENOSPC is injected in the writer instead (``L3M_CHECKPOINT_FAULT``); the JSON says which.

Checked after every kill: ``last.ckpt`` still loads; the resume succeeds and starts from the newest
*completed* save (nothing lost beyond it); at the end, the final checkpoint (weights, optimiser, LR
schedule, μ/λ state) and every scalar any run logged equal the uninterrupted run's, bit for bit.
Prints a table; writes ``bench/results/fault_injection.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from l3m_lightning.checkpointing import FAULT_ENV, checkpoint_problem  # noqa: E402

MAX_STEPS = 50
TINY = [
    "--config", str(ROOT / "configs" / "quickstart.yaml"),
    "--trainer.max_steps", str(MAX_STEPS),
    "--trainer.val_check_interval", "5",
    "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--model.policy.config", "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2}",
    "--model.sampling.max_new_tokens", "6",
    "--model.sampling.num_samples", "2",
    "--model.value_baseline.enabled", "true",
    "--model.export_dir", "",
    "--data.batch_size", "4",
    "--data.embedded_num_prompts", "40",
    "--data.max_val_rows", "4",
]


def fit(work: Path, ckpt_dir: Path, *args: str, env: dict[str, str], kill_after_s: float | None = None,
        journal_path: Path | None = None) -> tuple[int, str, float]:
    """One ``cli.py fit`` run; SIGKILL it from here ``kill_after_s`` seconds after its first step if given."""
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", *TINY,
           "--trainer.logger.init_args.save_dir", str(work / "runs"),
           "--trainer.callbacks.init_args.dirpath", str(ckpt_dir),
           "--trainer.callbacks.init_args.every_n_train_steps", "1",
           "--trainer.callbacks+=_resume_callbacks.KillAtStep",
           "--trainer.callbacks+=_resume_callbacks.SaveFaults", *args]
    start = time.time()
    with open(work / "stderr.txt", "w") as err:
        lines_before = _lines(journal_path)
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=err)
        if kill_after_s is not None:  # wait for this run's first step, then a random moment later
            while proc.poll() is None and _lines(journal_path) == lines_before and time.time() - start < 300:
                time.sleep(0.01)
        try:
            proc.wait(timeout=kill_after_s if kill_after_s is not None else 600)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    return proc.returncode, (work / "stderr.txt").read_text(), time.time() - start


def _lines(path: Path | None) -> int:
    return len(path.read_text().splitlines()) if path is not None and path.exists() else 0


def journal(path: Path) -> tuple[int, int]:
    """(last step reached, last step whose save completed) per the runs' journal."""
    reached, saved = 0, 0
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["step"]:
                reached = max(reached, int(parts[1]))
            elif parts[:1] == ["saved"]:
                saved = int(parts[1])  # in order: the last completed save
    return reached, saved


def ckpt_steps(ckpt_dir: Path) -> dict[str, int | None]:
    """Every ``*.ckpt`` in the folder: its global step, or None if it does not load."""
    out = {}
    for p in sorted(ckpt_dir.glob("*.ckpt")):
        out[str(p)] = None if checkpoint_problem(p) else int(torch.load(p, map_location="cpu", weights_only=True)["global_step"])
    return out


def scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {(t, e.step): e.value for t in acc.Tags()["scalars"] for e in acc.Scalars(t) if t != "hp_metric"}


def states_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(states_equal, a, b))
    return a == b


def try_mount(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0


def remount(folder: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(folder)], check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fault_injection.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="l3m-faults-", dir="/var/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="l3m-faults-tmp-", dir="/dev/shm"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), "TMPDIR": str(shm),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("L3M_CACHE", str(work / "cache"))
    for key in ("L3M_KILL_AT_STEP", "L3M_KILL_DURING_SAVE", FAULT_ENV):
        env.pop(key, None)
    t0 = time.time()

    # --- the reference: never interrupted
    ref = work / "reference"
    ref.mkdir(parents=True)
    code, err, ref_seconds = fit(ref, ref / "ckpt", env=env)
    assert code == 0, err[-3000:]
    print(f"reference run: {ref_seconds:.1f} s, {MAX_STEPS} steps", flush=True)

    # --- the faulty sequence
    run_dir = work / "faulty"
    ckpt_dir = run_dir / "ckpt"
    mounted = try_mount(ckpt_dir, "64m")
    full_disk_at = rng.randrange(3, args.kills - 2)  # before this kill, the disk fills up
    rows, resume = [], False
    jpath = run_dir / "journal.txt"
    ckpt_size = (ref / "ckpt" / "last.ckpt").stat().st_size
    try:
        i = 0
        while i < args.kills:
            reached_before, saved_before = journal(jpath)
            if i == full_disk_at and not any(r["kind"] == "full disk" for r in rows):
                rows.append(full_disk(run_dir, ckpt_dir, env, jpath, mounted, ckpt_size))
                continue
            kind = rng.choice(["time", "write", "step"])
            run_env = {**env, "L3M_JOURNAL": str(jpath)}
            kill_after = None
            if kind == "time":
                kill_after = rng.uniform(0.0, 0.25)
                moment = f"{kill_after:.2f} s after its first step"
            elif kind == "write":
                nth, nbytes = rng.randint(1, 8), rng.randint(1, ckpt_size - 1)
                run_env["L3M_KILL_DURING_SAVE"] = f"{nth}:{nbytes}"
                moment = f"save #{nth} ({'last.ckpt' if nth % 2 == 0 else 'step file'}), after {nbytes} of {ckpt_size} bytes"
            else:
                step = min(MAX_STEPS - 1, saved_before + rng.randint(1, 6))
                run_env["L3M_KILL_AT_STEP"] = str(step)
                moment = f"right after step {step}'s checkpoint"
            before = ckpt_steps(ckpt_dir)
            code, err, seconds = fit(run_dir, ckpt_dir, *(["--ckpt_path", "last"] if resume else []), env=run_env,
                                     kill_after_s=kill_after, journal_path=jpath)
            rows.append(cycle_row(i, kind, moment, code, err, seconds, before, ckpt_dir, jpath, saved_before, resume))
            print(format_row(rows[-1]), flush=True)
            if code == 0:
                print("  (the run finished before its kill: no more kills)", flush=True)
                break
            resume = True
            i += 1

        # --- finish: resume once more, to the end
        before = ckpt_steps(ckpt_dir)
        _, saved_before = journal(jpath)
        code, err, seconds = fit(run_dir, ckpt_dir, "--ckpt_path", "last", env={**env, "L3M_JOURNAL": str(jpath)})
        rows.append(cycle_row(i, "finish", "runs to the end", code, err, seconds, before, ckpt_dir, jpath, saved_before, True))
        print(format_row(rows[-1]), flush=True)
        final = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
        temps_left = sorted(p.name for p in ckpt_dir.glob(".*.tmp*"))
    finally:
        if mounted:
            final_copy = run_dir / "final_last.ckpt"
            if (ckpt_dir / "last.ckpt").exists():
                shutil.copy(ckpt_dir / "last.ckpt", final_copy)
            subprocess.run(["umount", str(ckpt_dir)], capture_output=True)
        shutil.rmtree(shm, ignore_errors=True)

    reference = torch.load(ref / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    same = {key: states_equal(reference[key], final[key]) for key in ("state_dict", "optimizer_states", "lr_schedulers", "l3m")}
    expected = scalars(ref / "runs" / "quickstart" / "version_0")
    logged: dict[tuple[str, int], list[float]] = {}
    for version in sorted((run_dir / "runs" / "quickstart").iterdir()):
        for key, value in scalars(version).items():
            logged.setdefault(key, []).append(value)
    differing = sorted(k for k, values in logged.items() if any(v != expected.get(k) for v in values))
    missing = sorted(set(expected) - set(logged))
    kills = [r for r in rows if r["kind"] not in ("finish", "full disk")]
    summary = {
        "kills": sum(r["exit"] == -9 for r in kills),
        "kills_during_a_checkpoint_write": sum(r["kind"] == "write" and r["exit"] == -9 for r in kills),
        "every_resume_succeeded": all(r["resumed_ok"] for r in rows if r["resumed"]),
        "last_ckpt_always_loadable": all(r["last_ckpt_after"] == "ok" for r in rows),
        "nothing_lost_beyond_last_completed_checkpoint": all(r["lost_ok"] for r in rows if r["resumed"]),
        "full_disk": next((r["moment"] for r in rows if r["kind"] == "full disk"), None),
        "final_step": int(final["global_step"]),
        "final_checkpoint_bit_identical": same,
        "logged_scalars": {"distinct": len(logged), "values": sum(map(len, logged.values())), "differing": len(differing),
                           "reference_missing": len(missing)},
        "full_disk_by": "tmpfs remounted too small (real ENOSPC)" if mounted else f"{FAULT_ENV}=ENOSPC injection in the writer",
        "tmpdir": str(shm) + " (tmpfs, another filesystem than the checkpoints)",
        "seconds": round(time.time() - t0, 1), "reference_seconds": round(ref_seconds, 1), "seed": args.seed,
    }
    # A killed run loses the scalars it logged after its last logger flush (at each checkpoint: ExactResume)
    # and before the kill; those of steps after the checkpoint are logged again by the resumed run.
    summary["missing_scalar_steps"] = sorted({step for _, step in missing})
    summary["temp_files_left_at_end"] = temps_left
    summary["pass"] = bool(summary["every_resume_succeeded"] and summary["last_ckpt_always_loadable"]
                           and summary["nothing_lost_beyond_last_completed_checkpoint"] and all(same.values())
                           and not differing and summary["final_step"] == MAX_STEPS)
    print()
    print(table(rows))
    print()
    for key, value in summary.items():
        print(f"{key}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "cycles": rows, "differing_scalars": differing[:20]}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if summary["pass"] else 1)


def cycle_row(i, kind, moment, code, err, seconds, before, ckpt_dir, jpath, saved_before, resumed) -> dict:
    """What one run did: how it ended, where it resumed from, what the kill left in the folder."""
    restored = re.search(r"Restoring states from the checkpoint path at (\S+)", err)
    restored_step = before.get(restored.group(1)) if restored else None
    reached, saved = journal(jpath)
    last = ckpt_dir / "last.ckpt"
    problem = checkpoint_problem(last) if last.exists() else "missing"
    fell_back = "resuming from" in err
    if saved_before:  # the newest completed save before this run is where it must start: nothing lost beyond it
        resumed_ok = lost_ok = restored_step == saved_before
    else:  # killed before its first save: a fresh start is right
        resumed_ok = lost_ok = restored is None
    return {
        "cycle": i, "kind": kind, "moment": moment, "exit": code, "seconds": round(seconds, 1),
        "resumed": resumed, "resumed_ok": resumed_ok or not resumed,
        "resumed_from_step": restored_step, "last_completed_save_before": saved_before, "lost_ok": lost_ok or not resumed,
        "fell_back": fell_back, "reached_step": reached, "last_completed_save_after": saved,
        "last_ckpt_after": "ok" if problem is None else problem,
        "stale_temp_files": len(list(ckpt_dir.glob(".*.tmp-*"))),
        "error_line": next((line for line in reversed(err.splitlines()) if line.startswith("error:")), None),
    }


def full_disk(run_dir: Path, ckpt_dir: Path, env: dict, jpath: Path, mounted: bool, ckpt_size: int) -> dict:
    """Resume on a disk with room for less than one more checkpoint: the save fails, the old files stay; free space, resume."""
    used = sum(p.stat().st_size for p in ckpt_dir.iterdir() if p.is_file())
    run_env = {**env, "L3M_JOURNAL": str(jpath)}
    if mounted:
        remount(ckpt_dir, used + ckpt_size // 2)
        moment = f"checkpoint tmpfs remounted at {used + ckpt_size // 2} bytes (used {used})"
    else:
        run_env[FAULT_ENV] = f"ENOSPC:{ckpt_size // 2}"
        moment = f"{FAULT_ENV}=ENOSPC:{ckpt_size // 2}"
    before = ckpt_steps(ckpt_dir)
    _, saved_before = journal(jpath)
    code, err, seconds = fit(run_dir, ckpt_dir, "--ckpt_path", "last", env=run_env)
    if mounted:
        remount(ckpt_dir, 64 * 2**20)
    row = cycle_row(-1, "full disk", moment, code, err, seconds, before, ckpt_dir, jpath, saved_before, True)
    row["lost_ok"] = row["lost_ok"] and code == 2 and bool(row["error_line"]) and "are intact" in row["error_line"]
    print(format_row(row), flush=True)
    return row


def format_row(r: dict) -> str:
    return (f"{r['cycle']:>5} {r['kind']:<9} exit {r['exit']:>4}  resumed from {str(r['resumed_from_step']):>4} "
            f"(last completed save {r['last_completed_save_before']:>2})  reached {r['reached_step']:>2}  "
            f"last.ckpt {r['last_ckpt_after'][:28]:<28} {r['moment']}")


def table(rows: list[dict]) -> str:
    head = "| # | kill | moment | exit | resumed from step | newest completed save | last.ckpt passed over (warning) | last.ckpt after | ok |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ok = r["resumed_ok"] and r["lost_ok"] and r["last_ckpt_after"] == "ok"
        lines.append(f"| {r['cycle']} | {r['kind']} | {r['moment']} | {r['exit']} | {r['resumed_from_step'] if r['resumed'] else '–'} | "
                     f"{r['last_completed_save_before'] if r['resumed'] else '–'} | {'yes' if r['fell_back'] else 'no'} | "
                     f"{r['last_ckpt_after']} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
