"""Stage entry points: what each Airflow task (and each `retrain <stage>` CLI command) calls.

Each stage takes the run directory and returns a small JSON-able dict for XCom. The effective configuration
(use-case YAML + this run's parameters, validated) is frozen into ``run_config.json`` by the first stage, so
retries and later stages use exactly what the run started with.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain import db
from retrain.config import UseCase, apply_params, load_use_case, parse_run_params, parse_use_case, run_dir_for

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    tmp.replace(path)


def load_run(run_dir: str | Path) -> tuple[UseCase, dict]:
    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this run directory was not prepared (run prepare_run first)")
    meta = json.loads(path.read_text())
    return parse_use_case(meta["use_case"], str(path)), meta


def prepare_run(use_case: str, run_id: str, params: dict | None = None) -> dict:
    """Validate the use case and the run's parameters, create the run directory, make sure the schema exists."""
    uc = load_use_case(use_case)
    run_params = parse_run_params(params or {})
    uc = apply_params(uc, run_params)
    run_dir = run_dir_for(uc.name, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    with db.connection() as conn:
        db.ensure_schema(conn)
        available = db.count_examples(conn, uc.name)
    _write_json(
        run_dir / RUN_CONFIG,
        {
            "run_id": run_id,
            "params": run_params.model_dump(),
            "use_case": uc.model_dump(mode="json"),
            "prepared_at": datetime.now(timezone.utc).isoformat(),
        },
    )
    log.info("run %s of %s prepared in %s (%d production examples in the table)", run_id, uc.name, run_dir, available)
    return {
        "run_dir": str(run_dir),
        "use_case": uc.name,
        "backend": uc.training.backend,
        "dry_run": run_params.dry_run,
        "production_examples": available,
    }


def collect(run_dir: str | Path) -> dict:
    from retrain.collect import collect_examples

    uc, meta = load_run(run_dir)
    split = uc.data.split
    with db.connection() as conn:
        result = collect_examples(
            conn,
            uc.name,
            meta["run_id"],
            Path(run_dir) / "batch.jsonl",
            split_ratios=(split.train, split.val),
            sample_limit=meta["params"].get("sample_limit"),
        )
    _write_json(Path(run_dir) / "collect.json", result)
    return {k: result[k] for k in ("rows", "skipped", "replayed")}


def build(run_dir: str | Path) -> dict:
    from retrain.dataset import build_dataset

    uc, meta = load_run(run_dir)
    with db.connection() as conn:
        return build_dataset(conn, uc, meta["run_id"], Path(run_dir))


def validate(run_dir: str | Path) -> dict:
    from retrain.validate import validate_dataset

    uc, _ = load_run(run_dir)
    return validate_dataset(run_dir, uc)


def summarize(run_dir: str | Path) -> dict:
    """One screen for the task log and the demo: where the dataset, its manifest and the Data Docs are."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    validation = json.loads((run_dir / "validation.json").read_text()) if (run_dir / "validation.json").is_file() else {}
    summary = {
        "run_dir": str(run_dir),
        "counts": manifest["counts"],
        "dataset": {s: str(run_dir / f"{s}.jsonl") for s in ("train", "val", "test")},
        "manifest": str(run_dir / "manifest.json"),
        "data_docs": validation.get("data_docs"),
        "validation_success": validation.get("success"),
    }
    _write_json(run_dir / "summary.json", summary)
    return summary
