-- Idempotent schema for the examples database and the model registry. Applied by retrain.db.ensure_schema()
-- at the start of every run: every statement must be safe to run again.

CREATE TABLE IF NOT EXISTS production_examples (
    id               BIGSERIAL PRIMARY KEY,
    use_case         TEXT        NOT NULL,
    input            TEXT,
    model_output     JSONB,
    corrected_output JSONB,
    feedback         TEXT        NOT NULL CHECK (feedback IN ('accepted', 'corrected', 'rejected')),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Incremental collection walks ids per use case (the watermark is an id: see retrain/collect.py).
CREATE INDEX IF NOT EXISTS production_examples_collect_idx
    ON production_examples (use_case, id);

-- One row per use case: the highest production_examples.id already collected (created_at is for humans).
CREATE TABLE IF NOT EXISTS collection_watermarks (
    use_case    TEXT PRIMARY KEY,
    created_at  TIMESTAMPTZ NOT NULL,
    id          BIGINT      NOT NULL,
    run_id      TEXT        NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The exact window each DAG run collected, so a retried or cleared task re-reads the same rows and
-- never moves the watermark twice.
CREATE TABLE IF NOT EXISTS collection_runs (
    use_case       TEXT        NOT NULL,
    run_id         TEXT        NOT NULL,
    from_created_at TIMESTAMPTZ,
    from_id        BIGINT,
    to_created_at  TIMESTAMPTZ,
    to_id          BIGINT,
    rows_collected INTEGER     NOT NULL,
    rows_skipped   JSONB       NOT NULL DEFAULT '{}'::jsonb,
    collected_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, run_id)
);

-- The curated (scrubbed) dataset, accumulated across months. An example's split is fixed by the hash of its
-- normalised input; test rows are frozen at first sight so every month is evaluated on a superset of the
-- previous months' test set.
CREATE TABLE IF NOT EXISTS dataset_examples (
    use_case      TEXT        NOT NULL,
    input_hash    TEXT        NOT NULL,
    split         TEXT        NOT NULL CHECK (split IN ('train', 'val', 'test')),
    input         TEXT        NOT NULL,
    label         JSONB       NOT NULL,
    source_id     BIGINT      NOT NULL,
    first_run_id  TEXT        NOT NULL,
    last_run_id   TEXT        NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, input_hash)
);

-- Model registry (filled by the evaluation/deploy stages).
CREATE TABLE IF NOT EXISTS model_versions (
    id          BIGSERIAL PRIMARY KEY,
    use_case    TEXT        NOT NULL,
    version     INTEGER     NOT NULL,
    backend     TEXT        NOT NULL,
    base_model  TEXT        NOT NULL,
    artifact    TEXT        NOT NULL,
    run_id      TEXT,
    metrics     JSONB       NOT NULL DEFAULT '{}'::jsonb,
    decision    JSONB       NOT NULL DEFAULT '{}'::jsonb,
    status      TEXT        NOT NULL CHECK (status IN ('candidate', 'production', 'rejected', 'retired')),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (use_case, version)
);
-- At most one production model per use case, enforced by the database rather than by code.
CREATE UNIQUE INDEX IF NOT EXISTS model_versions_one_production
    ON model_versions (use_case) WHERE status = 'production';

-- Registry history: every registration, decision, promotion, rejection and rollback, with who and why.
CREATE TABLE IF NOT EXISTS model_events (
    id          BIGSERIAL PRIMARY KEY,
    use_case    TEXT        NOT NULL,
    version     INTEGER     NOT NULL,
    action      TEXT        NOT NULL CHECK (action IN ('register', 'decide', 'promote', 'reject', 'rollback')),
    from_status TEXT,
    to_status   TEXT        NOT NULL,
    actor       TEXT        NOT NULL,
    reason      TEXT        NOT NULL DEFAULT '',
    run_id      TEXT,
    details     JSONB       NOT NULL DEFAULT '{}'::jsonb,
    at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS model_events_use_case_idx ON model_events (use_case, id);
-- A retried training task registers its run again: one version per (use case, run), enforced by the database.
CREATE UNIQUE INDEX IF NOT EXISTS model_versions_one_per_run
    ON model_versions (use_case, run_id) WHERE run_id IS NOT NULL;

-- One row per DAG run of a use case: stage durations, rows, validation, metrics, decision, backup. Written by
-- retrain.runs stage by stage; the UI page reads it.
CREATE TABLE IF NOT EXISTS pipeline_runs (
    use_case         TEXT        NOT NULL,
    run_id           TEXT        NOT NULL,
    status           TEXT        NOT NULL DEFAULT 'running',
    run_dir          TEXT,
    stages           JSONB       NOT NULL DEFAULT '{}'::jsonb,   -- {stage: seconds}, last attempt wins
    stage_order      TEXT[]      NOT NULL DEFAULT '{}',          -- stages in the order they first finished
    rows_collected   INTEGER,
    rows_rejected    INTEGER,
    validation       JSONB,                                      -- {"success": bool, "failed": [...], ...}
    metrics          JSONB,                                      -- {"baseline": {...}, "candidate": {...}}
    decision         TEXT,                                       -- GO | NO-GO
    decision_reasons JSONB,                                      -- ["one line per failed/decisive check", ...]
    model_version    INTEGER,
    backup_id        TEXT,
    error            TEXT,
    started_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, run_id)
);
CREATE INDEX IF NOT EXISTS pipeline_runs_recent_idx ON pipeline_runs (started_at DESC);
