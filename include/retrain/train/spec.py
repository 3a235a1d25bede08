"""The effective training spec of a prepared run directory, and what a checkpoint was computed from.

``schemas.training`` defines the fields; this module resolves them for one run: the use case's frozen
``training`` block, then ``run_dir/train_overrides.json`` (a hand-written file an operator drops in before a retry),
then the overrides the task passes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retrain.rundir import RunDir, load_run, sha256_file
from retrain.schemas.training import TrainingSpec, TrainingSpecError, spec_from_use_case

_EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256 of b""


def read_overrides_file(run_dir: str | Path) -> dict[str, Any]:
    path = RunDir(run_dir).train_overrides
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainingSpecError(f"{path} is not valid JSON ({exc}); fix or delete it and retry") from None
    if not isinstance(data, dict):
        raise TrainingSpecError(f"{path} must hold a JSON object of TrainingSpec fields, got {type(data).__name__}")
    return data


def spec_for_run(run_dir: str | Path, extra_overrides: dict[str, Any] | None = None) -> TrainingSpec:
    """The effective spec of a prepared run directory: use case + train_overrides.json + extra_overrides."""
    uc, _ = load_run(run_dir)
    overrides = {**read_overrides_file(run_dir), **(extra_overrides or {})}
    return spec_from_use_case(uc.training, overrides)


def run_fingerprint(run_dir: str | Path, spec: TrainingSpec, base_model: str) -> dict[str, str]:
    """What a checkpoint or a finished result was computed from: settings, base model and data files.

    A checkpoint is only resumed, and a finished result only reused, when all of it is unchanged (a rebuilt
    dataset or another base model must retrain from scratch).
    """
    out = {"spec": spec.fingerprint(), "base_model": base_model}
    for name in ("train", "val"):
        path = RunDir(run_dir).split(name)
        # An absent split hashes as empty (sha256 of b""), as it always has.
        out[name + "_sha256"] = sha256_file(path) if path.is_file() else _EMPTY_SHA256
    return out


def compute_dtype_name(cuda: bool) -> str:
    # bf16 compute is the QLoRA recipe on GPUs; on CPU it diverged here (nf4, loss 3.1 -> 6.6) while float32
    # learned, and CPUs gain little from bf16 anyway.
    return "bfloat16" if cuda else "float32"
