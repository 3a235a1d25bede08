"""Publish a model version and move the production alias, in step with the registry.

Local (hf) models live in ``$RETRAIN_HOME/models/<use_case>/``::

    versions/v1/  versions/v2/ ...   immutable copies of each deployed merged model (kept for rollback)
    production -> versions/v2        the alias serving reads; switched atomically (symlink to a temp name + rename)
    production.json                  what is in production, for either backend (an OpenAI model has no files)

A deploy copies the merged model into ``versions/v<N>`` first (outside any lock: it is the slow part), then, inside
the registry transaction that promotes the version, switches the alias. If the switch fails nothing is committed;
if the commit fails the alias is switched back. Every step is idempotent, so a retried task converges.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from retrain.registry import store as registry
from retrain.rundir import write_json
from retrain.settings import state_dir
from retrain.registry.store import RegistryError

log = logging.getLogger(__name__)

SOURCE_FILE = "DEPLOYED_FROM.json"  # inside each version dir: which artifact it is a copy of
MIN_REASON_CHARS = 10  # same rule as the rollback_model DAG's `reason` Param: "bad" explains nothing later


class DeployError(RegistryError):
    """The model files cannot be published; the message says what to fix."""


def models_root() -> Path:
    return state_dir() / "models"


def use_case_models_dir(use_case: str) -> Path:
    return models_root() / use_case


def version_dir(use_case: str, version: int) -> Path:
    return use_case_models_dir(use_case) / "versions" / f"v{int(version)}"


def production_link(use_case: str) -> Path:
    """The alias serving reads (a symlink to versions/v<N>)."""
    return use_case_models_dir(use_case) / "production"


def _publishable(path: Path) -> bool:
    """A saved model (config.json), or a tenant's export: adapter/ + Modelfile (retrain.registry.tenants)."""
    return (path / "config.json").is_file() or (
        (path / "adapter" / "adapter_config.json").is_file() and (path / "Modelfile").is_file())


def _read_source(path: Path) -> dict | None:
    try:
        return json.loads((path / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _same_source(marker: dict | None, source: Path, run_id: str | None) -> bool:
    return bool(marker) and marker.get("source") == str(source) and marker.get("run_id") == run_id


def stage_version(use_case: str, version: int, merged_dir: str | Path, *, run_id: str | None = None) -> dict:
    """Copy a merged model into versions/v<N> (atomically: a crash never leaves a half-copied version dir)."""
    src = Path(merged_dir).expanduser().resolve()
    if not _publishable(src):
        raise DeployError(
            f"cannot deploy {use_case} v{version}: {src} is not a saved model (no config.json). The training run's "
            f"merged model is gone or incomplete; re-run train_candidate, or roll back to a version still on disk."
        )
    dest = version_dir(use_case, version)
    if _same_source(_read_source(dest), src, run_id):
        return {"path": str(dest), "copied": False}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(SOURCE_FILE))
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "use_case": use_case, "version": int(version), "source": str(src), "run_id": run_id,
            "copied_at": datetime.now(timezone.utc).isoformat(),
        }, indent=2))
        if dest.exists():
            # A version dir from another registry (the database was recreated while the model store was kept):
            # the registry is the truth, so replace it rather than serve the wrong weights under this number.
            log.warning("replacing %s: it holds %s, the registry says v%s is %s", dest,
                        (_read_source(dest) or {}).get("source"), version, src)
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, trash / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("staged %s v%s: %s -> %s", use_case, version, src, dest)
    return {"path": str(dest), "copied": True}


def _current_target(link: Path) -> str | None:
    return os.readlink(link) if link.is_symlink() else None


def _swap_link(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` in one rename: readers see the old or the new model, never no model."""
    if link.exists() and not link.is_symlink():
        raise DeployError(f"{link} is a real directory or file, not the production symlink: move it away "
                          f"(it is not managed by the registry) and deploy again")
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def _fsync_dir(path: Path) -> None:
    # Makes the rename durable: after a power cut the alias is not silently back on the old version.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_pointer(use_case: str, data: dict) -> None:
    write_json(use_case_models_dir(use_case) / "production.json",
               data | {"updated_at": datetime.now(timezone.utc).isoformat()})


def switch_production(use_case: str, version: int) -> dict:
    """Point the production alias at versions/v<N> (already staged). A no-op when it already does."""
    link = production_link(use_case)
    target = f"versions/v{int(version)}"  # relative, so the model store can be moved or mounted elsewhere
    if not _publishable(link.parent / target):
        raise DeployError(f"{link.parent / target} is not staged: call stage_version (or deploy) first")
    previous = _current_target(link)
    switched = previous != target
    if switched:
        _swap_link(link, target)
    _write_pointer(use_case, {"use_case": use_case, "version": int(version), "kind": "hf", "path": str(link),
                              "version_dir": str(link.parent / target)})
    return {"production": str(link), "target": str(link.parent / target), "previous_target": previous,
            "switched": switched}


def model_path(row: dict) -> str:
    """Local directory of a registered hf model version: its deployed copy, else the training artifact."""
    deployed = version_dir(row["use_case"], row["version"])
    src = Path(row["artifact"]).expanduser().resolve()
    if _same_source(_read_source(deployed), src, row.get("run_id")):
        return str(deployed)
    if _publishable(src):
        return str(src)
    raise DeployError(
        f"{row['use_case']} v{row['version']} has no model files: neither {deployed} nor {src} holds it. "
        f"Roll back to a version still on disk (`retrain rollback --use-case {row['use_case']} --to-version N "
        f"--reason ...`) or retrain."
    )


def baseline_spec(conn, uc) -> dict:
    """The model the candidate must beat: the production model of the use case, or the base model on a first run.

    The hf path of a production model is its immutable deployed version directory rather than the ``production``
    alias, so a rollback during an evaluation cannot swap the baseline halfway through the test set.
    """
    row = registry.production(conn, uc.name)
    if row is None:
        if uc.training.backend == "openai":
            spec = {"kind": "openai", "model": uc.training.openai_base_model, "base_url": None}
        else:
            # The configured name (e.g. "smollm2-135m-instruct"): models.resolve_base_model turns it into a path.
            spec = {"kind": "hf", "path": uc.training.base_model}
        return spec | {"label": "baseline", "baseline_kind": "base_model", "version": None,
                       "base_model": uc.training.base_model if spec["kind"] == "hf" else uc.training.openai_base_model}
    if row["backend"] == "openai":
        # base_url None: the OpenAI connection (or OPENAI_BASE_URL) that trained it serves it.
        spec = {"kind": "openai", "model": row["artifact"], "base_url": None}
    else:
        spec = {"kind": "hf", "path": model_path(row)}
    return spec | {"label": "baseline", "baseline_kind": "production", "version": row["version"],
                   "base_model": row["base_model"]}


def _publisher(use_case: str, kind: str):
    """The file-side step run inside the registry transaction, and how to undo it if the commit fails."""
    undo: dict = {}

    def apply(result: dict) -> dict:
        link = production_link(use_case)
        undo["target"] = _current_target(link)
        undo["touched"] = True
        if kind == "openai":
            # Nothing to serve from disk: drop a stale hf alias so nobody keeps serving a retired local model.
            if link.is_symlink():
                link.unlink()
            _write_pointer(use_case, {"use_case": use_case, "version": result["version"], "kind": "openai",
                                      "model": result["artifact"]})
            return {"kind": "openai", "model": result["artifact"], "production": None}
        staged = stage_version(use_case, result["version"], result["artifact"], run_id=result["run_id"])
        return {"kind": "hf"} | staged | switch_production(use_case, result["version"])

    def revert() -> None:
        if not undo.get("touched"):
            return
        link = production_link(use_case)
        try:
            if undo["target"] is None:
                if link.is_symlink():
                    link.unlink()
            else:
                _swap_link(link, undo["target"])
        except OSError as exc:  # the original error matters more; say what is left to fix
            log.error("could not restore %s to %s after a failed registry commit: %s", link, undo["target"], exc)

    return apply, revert


def _kind(backend: str) -> str:
    return "openai" if backend == "openai" else "hf"


def deploy(conn, *, use_case: str, version: int, actor: str, reason: str, run_id: str | None = None,
           details: dict | None = None) -> dict:
    """Promote ``version`` in the registry and publish it (hf: copy + alias switch; openai: record the model id).

    Safe to retry: an already-production version is re-published (repairing a half-done attempt), not re-promoted.
    """
    row = registry.get_version(conn, use_case, version)
    kind = _kind(row["backend"])
    if kind == "hf":
        # The slow copy happens before the registry lock is taken; the alias switch happens under it.
        stage_version(use_case, version, row["artifact"], run_id=row["run_id"])
    apply, revert = _publisher(use_case, kind)
    try:
        result = registry.promote(conn, use_case=use_case, version=version, actor=actor, reason=reason,
                                  run_id=run_id, apply=apply, details=details)
    except BaseException:
        revert()
        raise
    return result | {"kind": kind}


def rollback_deploy(conn, *, use_case: str, to_version: int | None = None, actor: str, reason: str,
                    run_id: str | None = None) -> dict:
    """Registry rollback (to ``to_version`` or the previous production version) plus the matching alias switch."""
    kinds: dict = {}

    def apply(result: dict) -> dict:
        kinds["kind"] = _kind(result["backend"])
        publish, kinds["revert"] = _publisher(use_case, kinds["kind"])
        return publish(result)

    try:
        result = registry.rollback(conn, use_case=use_case, to_version=to_version, actor=actor, reason=reason,
                                   run_id=run_id, apply=apply)
    except BaseException:
        if "revert" in kinds:
            kinds["revert"]()
        raise
    return result | {"kind": _kind(result["backend"])}


def run_rollback(use_case: str, *, to_version: int | None = None, reason: str, actor: str,
                 run_id: str | None = None, model: str | None = None) -> dict:
    """Entry point of the rollback_model DAG and `retrain rollback`: opens the database and rolls back. ``model``:
    the registry key when it is not the use case's name (a tenant's adapter: retrain.registry.tenants.model_key)."""
    from retrain import db
    from retrain.schemas.use_case import load_use_case

    load_use_case(use_case)  # an unknown name fails here, listing the known use cases
    model = model or use_case
    if len((reason or "").strip()) < MIN_REASON_CHARS:
        raise RegistryError(f"the rollback reason must be at least {MIN_REASON_CHARS} characters (it is what the "
                            f"history shows later): say what is wrong with the current model")
    with db.connection() as conn:
        db.ensure_schema(conn)
        result = rollback_deploy(conn, use_case=model, to_version=to_version, actor=actor, reason=reason,
                                 run_id=run_id)
    if result["changed"]:
        log.info("ROLLBACK %s: production is now v%s (was v%s), by %s: %s", model, result["version"],
                 result["previous_version"], actor, reason)
    else:
        log.info("ROLLBACK %s: v%s was already production; nothing changed", model, result["version"])
    return result
