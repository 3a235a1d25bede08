"""Resumable checkpoints: which one is complete, which one to resume from, and when to discard them all.

A checkpoint is resumed only when it was computed from the same settings, base model and data: the run's
fingerprint (``retrain.train.spec.run_fingerprint``) is recorded next to the checkpoints, and a different one
discards them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from retrain.rundir import write_json
from retrain.train.qlora.progress import is_main_process, say

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step of a ``checkpoint-N`` directory (None for any other name)."""
    m = _CHECKPOINT.match(path.name)
    return int(m.group(1)) if m else None


def is_complete_checkpoint(path: Path) -> bool:
    """True when the Trainer finished writing this checkpoint.

    transformers writes weights, then optimizer/scheduler/RNG, then ``trainer_state.json`` last; a SIGKILL
    in between leaves a directory without a parseable trainer state (or without the optimizer), which must not
    be resumed from.
    """
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    step = checkpoint_step(path)
    weights = any((path / f).is_file() for f in ("adapter_model.safetensors", "model.safetensors"))
    return bool(
        step is not None
        and state.get("global_step") == step
        and weights
        and (path / "optimizer.pt").is_file()
        and (path / "scheduler.pt").is_file()
        and any(path.glob("rng_state*.pth"))
    )


def latest_complete_checkpoint(checkpoints: Path) -> Path | None:
    if not checkpoints.is_dir():
        return None
    found = [(step, p) for p in checkpoints.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None]
    for _, path in sorted(found, reverse=True):
        if is_complete_checkpoint(path):
            return path
    return None


def prepare_checkpoint_dir(checkpoints: Path, fingerprint_path: Path, fingerprint: dict, resume: str) -> Path | None:
    """The checkpoint to resume from (or None), after discarding checkpoints that belong to other settings.

    ``resume``: 'auto' (newest complete checkpoint), 'never' (discard them) or a checkpoint directory.
    ``fingerprint_path`` records what the checkpoints in ``checkpoints`` were computed from.
    """
    checkpoints.mkdir(parents=True, exist_ok=True)
    previous = json.loads(fingerprint_path.read_text()) if fingerprint_path.is_file() else None
    stale = resume == "never" or (previous is not None and previous != fingerprint)
    if stale and any(checkpoints.glob("checkpoint-*")):
        why = "--resume never" if resume == "never" else f"settings changed ({_diff(previous, fingerprint)})"
        say(f"[train] discarding existing checkpoints: {why}")
        for p in checkpoints.glob("checkpoint-*"):
            shutil.rmtree(p, ignore_errors=True)
    if is_main_process():
        write_json(fingerprint_path, fingerprint)
    if resume == "never":
        return None
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not is_complete_checkpoint(path):
            raise ValueError(f"--resume {resume} is not a complete checkpoint directory; use --resume auto")
        return path
    return latest_complete_checkpoint(checkpoints)


def _diff(a: dict | None, b: dict) -> str:
    a = a or {}
    return ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)) or "unknown"
