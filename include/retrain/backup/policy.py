"""Backup policy: whether and how much to keep for a use case, and where a restore may write.

Restores write only under ``$RETRAIN_HOME/restores/`` (plus the directories in ``RETRAIN_RESTORE_ROOTS``), never
into the directories Airflow loads code from, the state directory itself, the models, the runs or the embedded
database, and the target is checked before anything is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from retrain import settings
from retrain.backup.common import DEFAULT_REMOVE, BackupError, check_backup_id


def backup_settings(uc) -> dict:
    """Backup policy of a use case: its ``backup:`` section when the config has one, else the environment
    (RETRAIN_BACKUP_ENABLED, RETRAIN_BACKUP_KEEP, RETRAIN_BACKUP_CLEANUP, RETRAIN_BACKUP_CLEANUP_FILES as
    comma-separated paths/globs relative to the run directory), else the defaults."""
    section = getattr(uc, "backup", None)

    def pick(name: str, default, cast):
        if section is not None and getattr(section, name, None) is not None:
            return getattr(section, name)
        raw = settings.backup_policy_env(name)
        return cast(raw) if raw else default

    def flag(text: str) -> bool:
        return text.lower() not in ("0", "false", "no", "off")

    def count(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise BackupError(f"RETRAIN_BACKUP_KEEP={text!r} is not a whole number; set how many backups to keep "
                              "per use case, e.g. 6") from None

    keep = pick("keep", 6, count)
    if keep < 1:
        raise BackupError(f"backup keep={keep} must be at least 1 (RETRAIN_BACKUP_KEEP or backup.keep in the use case)")
    return {
        "enabled": pick("enabled", True, flag),
        "keep": keep,
        "cleanup": pick("cleanup", True, flag),
        "cleanup_files": tuple(pick("cleanup_files", DEFAULT_REMOVE,
                                    lambda text: [p.strip() for p in text.split(",") if p.strip()])),
    }


# --- where restores may write -------------------------------------------------------------------------------


def _roots() -> list[Path]:
    try:
        return settings.restore_roots()
    except settings.SettingsError as exc:
        raise BackupError(str(exc)) from None


def _why_not(target: Path, roots: list[Path]) -> str | None:
    """Why ``target`` (resolved) may not receive a restore, or None."""
    home = settings.state_dir()
    if not any(target != r and target.is_relative_to(r) for r in roots):
        return "it is outside the restore root"
    if target.is_relative_to(home) and not (target.is_relative_to(roots[0]) and target != roots[0]):
        return f"it is inside the state directory {home}"
    for kept in (home, home / "postgres", settings.models_root(), settings.runs_dir(),
                 *settings.airflow_code_folders()):
        if target.is_relative_to(kept) and kept != home:
            return f"it is inside {kept}"
        if kept.is_relative_to(target):
            return f"it contains {kept}"
    return None


def restore_target(backup_id: str, target_dir: str | Path | None, *, overwrite: bool = False) -> Path:
    """The resolved directory a restore of ``backup_id`` will write, after refusing (with one line naming the
    allowed root) a target outside the restore roots, a '..' path, a symlink that leads elsewhere, and a
    non-empty directory unless ``overwrite``. Touches neither S3 nor the target."""
    use_case, run = check_backup_id(backup_id)
    roots = _roots()
    given = Path(target_dir).expanduser() if target_dir else roots[0] / use_case / run
    allowed = f"restores write only under the restore root {roots[0]}"
    if roots[1:]:
        allowed += " or " + ", ".join(str(r) for r in roots[1:])
    allowed += " (list more roots in RETRAIN_RESTORE_ROOTS)"
    if ".." in given.parts:
        raise BackupError(f"refusing to restore into {given}: the path contains '..'; {allowed}")
    target = given.absolute().resolve()  # follows every symlink that already exists on the way
    why = _why_not(target, roots)
    if why:
        shown = f"{given} (= {target})" if target != given.absolute() else str(given)
        raise BackupError(f"refusing to restore into {shown}: {why}; {allowed}")
    if target.exists() and not target.is_dir():
        raise BackupError(f"restore target {target} exists and is not a directory: choose another target_dir")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise BackupError(f"restore target {target} is not empty: choose a new or empty target directory, or "
                          "replace it as a whole with --overwrite (CLI) / overwrite=true (restore_backup DAG)")
    return target
