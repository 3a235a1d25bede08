"""
# Restore an encrypted run backup from S3 (`restore_backup`)

Manual DAG (no schedule). Trigger it with:

* **backup_id** — `<use_case>/<run>`, e.g. `product_intent/scheduled__2026-11-01T03_00_00_00_00`
  (`retrain backup list --use-case product_intent` prints them, newest first);
* **target_dir** — where to unpack; empty = `$RETRAIN_HOME/restores/<backup_id>`. Must lie under the restore root
  `$RETRAIN_HOME/restores/` (or a directory listed in `RETRAIN_RESTORE_ROOTS`): the DAGs and plugins folders,
  `$RETRAIN_HOME` itself, its models, runs and database, `..` and symlinks leading elsewhere are refused before
  anything is downloaded. Must be new or empty unless **overwrite** is set (then the directory, inside the root,
  is replaced as a whole).

Tasks:

1. **check_backup** checks the target directory first, then reads the manifest, unwraps the data key with the
   configured master key (or the configured AWS KMS key only) and checks the manifest's MAC, that it is the latest
   version recorded for that id, and the archive size — a bad target, a wrong key, a rolled-back or a
   missing/incomplete backup fails here, fast;
2. **restore** downloads the archive, authenticates every AES-256-GCM chunk, checks the SHA-256 of the ciphertext
   and of every file against the manifest, and only then moves the unpacked directory into place. A tampered,
   truncated or mismatched backup fails without retries and leaves no partial files.

S3 comes from the Airflow connection `retrain_s3` (or `RETRAIN_S3_*`/`AWS_*` variables); the master key from the
connection `retrain_backup_key` (password) or `RETRAIN_BACKUP_MASTER_KEY`. Task bodies are one call into
`retrain.backup.operations`; boto3 and cryptography are imported only when a task runs.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, chain, dag, task

BACKUP_ID_PATTERN = r"^[a-z][a-z0-9_]{1,62}/[A-Za-z0-9._-]{1,200}$"


def _call(fn, *args, **kwargs) -> dict:
    """A tampered or missing backup, a wrong key or a busy target are not transient: fail the task without
    burning retries. S3 being unreachable (BackupUnavailableError) or anything unexpected keeps the retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from retrain.backup.operations import BackupError, BackupUnavailableError

    try:
        return fn(*args, **kwargs)
    except BackupUnavailableError:
        raise
    except BackupError as exc:
        raise AirflowFailException(str(exc)) from exc


@dag(
    dag_id="restore_backup",
    description="Restore an encrypted run backup from S3 into a directory, verified byte for byte",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(hours=2),
    },
    params={
        "backup_id": Param(
            type="string",
            pattern=BACKUP_ID_PATTERN,
            description="<use_case>/<run>, as printed by `retrain backup list --use-case <name>`",
        ),
        "target_dir": Param(
            "", type="string",
            description="directory to restore into, under $RETRAIN_HOME/restores/ (or RETRAIN_RESTORE_ROOTS); "
                        "empty = $RETRAIN_HOME/restores/<backup_id>"
        ),
        "overwrite": Param(False, type="boolean", description="replace target_dir if it is not empty"),
    },
    tags=["retrain", "ops", "backup"],
)
def restore_backup():
    @task(execution_timeout=timedelta(minutes=5))
    def check_backup(params=None) -> dict:
        from retrain.backup.operations import check_restore

        return _call(check_restore, params["backup_id"], params["target_dir"] or None,
                     overwrite=params["overwrite"])

    @task
    def restore(checked: dict, params=None) -> dict:
        from retrain.backup.operations import restore_backup

        return _call(restore_backup, checked["backup_id"], params["target_dir"] or None,
                     overwrite=params["overwrite"])

    checked = check_backup()
    chain(checked, restore(checked))


restore_backup()
