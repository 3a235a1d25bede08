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

-- Late corrections (issue 16): collection walks (updated_at, id), so a row corrected after it was collected is
-- collected again next month, exactly once. Rows that existed before this column get the epoch (collected or not
-- by the old id watermark, see retrain/data/collect.py); new rows get now(); a trigger bumps it on every change of
-- the example. Guarded by catalog checks instead of ADD COLUMN IF NOT EXISTS / DROP TRIGGER: those take an
-- ACCESS EXCLUSIVE lock on the production table at every run start even when there is nothing to do.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'production_examples'::regclass
                   AND attname = 'updated_at' AND NOT attisdropped) THEN
        ALTER TABLE production_examples ADD COLUMN updated_at TIMESTAMPTZ NOT NULL DEFAULT '1970-01-01 00:00:00+00';
        ALTER TABLE production_examples ALTER COLUMN updated_at SET DEFAULT now();
    END IF;
END $$;

CREATE OR REPLACE FUNCTION production_examples_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'production_examples'::regclass
                   AND tgname = 'production_examples_touch' AND NOT tgisinternal) THEN
        CREATE TRIGGER production_examples_touch BEFORE UPDATE ON production_examples FOR EACH ROW
            WHEN (OLD.input IS DISTINCT FROM NEW.input OR OLD.model_output IS DISTINCT FROM NEW.model_output
                  OR OLD.corrected_output IS DISTINCT FROM NEW.corrected_output OR OLD.feedback IS DISTINCT FROM NEW.feedback)
            EXECUTE FUNCTION production_examples_touch();
    END IF;
END $$;

CREATE INDEX IF NOT EXISTS production_examples_updated_idx
    ON production_examples (use_case, updated_at, id);

-- Generation use cases (issue 20): whose example a row is (a user id; one adapter per tenant). NULL for the
-- structured use cases. Catalog-guarded like updated_at: no ACCESS EXCLUSIVE lock at run start when present.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'production_examples'::regclass
                   AND attname = 'tenant' AND NOT attisdropped) THEN
        ALTER TABLE production_examples ADD COLUMN tenant TEXT;
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS production_examples_tenant_idx
    ON production_examples (use_case, tenant);

-- The watermark and each run's window in (updated_at, id) order. NULL row_updated_at = a watermark written by
-- the id-only collector: it continues from (epoch, id), which is where the pre-existing rows sort.
ALTER TABLE collection_watermarks ADD COLUMN IF NOT EXISTS row_updated_at TIMESTAMPTZ;
ALTER TABLE collection_runs ADD COLUMN IF NOT EXISTS from_updated_at TIMESTAMPTZ;
ALTER TABLE collection_runs ADD COLUMN IF NOT EXISTS to_updated_at TIMESTAMPTZ;
-- A scheduled run (or one triggered for a logical date) collects rows changed before its data_interval_end only;
-- rows at or after it belong to the next run. NULL: a manual run without a data interval (collected up to now).
ALTER TABLE collection_runs ADD COLUMN IF NOT EXISTS data_interval_start TIMESTAMPTZ;
ALTER TABLE collection_runs ADD COLUMN IF NOT EXISTS data_interval_end TIMESTAMPTZ;

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

-- The manifest digest (SHA-256 of the manifest object's bytes) of the latest backup written under each backup id.
-- verify/restore refuse a manifest with another digest: an older backup copied back into the bucket. Written by
-- retrain.backup.versions.
CREATE TABLE IF NOT EXISTS backup_versions (
    backup_id        TEXT        PRIMARY KEY,
    use_case         TEXT        NOT NULL,
    run_id           TEXT        NOT NULL,
    manifest_sha256  TEXT        NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Label precedence (retrain.data.dataset): a human correction is never replaced by an accepted model output, and
-- of two human corrections the newer (label_updated_at, else source_id) wins.
ALTER TABLE dataset_examples ADD COLUMN IF NOT EXISTS label_human BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE dataset_examples ADD COLUMN IF NOT EXISTS label_updated_at TIMESTAMPTZ;

-- Sweeps (issue 19): the candidates of a hyper-parameter sweep that lost on the validation split are registered as
-- not_selected, with their scores (retrain.registry.store.record_not_selected). The status CHECK gains the value
-- only when it lacks it, keeping every value it already allows (other additions included).
DO $$
DECLARE
    def TEXT;
BEGIN
    SELECT pg_get_constraintdef(oid) INTO def FROM pg_constraint
     WHERE conrelid = 'model_versions'::regclass AND conname = 'model_versions_status_check';
    IF def IS NOT NULL AND position('not_selected' IN def) = 0 AND position('ARRAY[' IN def) > 0 THEN
        ALTER TABLE model_versions DROP CONSTRAINT model_versions_status_check;
        EXECUTE 'ALTER TABLE model_versions ADD CONSTRAINT model_versions_status_check '
                || replace(def, 'ARRAY[', 'ARRAY[''not_selected''::text, ');
    END IF;
END $$;

-- Active learning (issue 19): the hard production examples of a run queued for human review (retrain.review).
-- One row per (use case, run, production_examples.id): a retried selection upserts, never duplicates. `retrain
-- review import` writes the reviewer's answer to production_examples.corrected_output and marks the row reviewed.
CREATE TABLE IF NOT EXISTS review_queue (
    use_case          TEXT             NOT NULL,
    run_id            TEXT             NOT NULL,
    source_id         BIGINT           NOT NULL,      -- production_examples.id
    rank              INTEGER          NOT NULL,      -- 1 = hardest of the run
    score             DOUBLE PRECISION NOT NULL,
    reasons           TEXT[]           NOT NULL,      -- low_margin, disagreement, schema_failure
    margin            DOUBLE PRECISION,               -- candidate's top1 - top2 log-prob at the primary label
    input             TEXT             NOT NULL,      -- as collected (PII scrubbed)
    candidate_output  TEXT,
    production_output TEXT,
    details           JSONB            NOT NULL DEFAULT '{}'::jsonb,
    status            TEXT             NOT NULL DEFAULT 'queued' CHECK (status IN ('queued', 'reviewed')),
    reviewed_output   JSONB,
    reviewed_at       TIMESTAMPTZ,
    created_at        TIMESTAMPTZ      NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ      NOT NULL DEFAULT now(),
    PRIMARY KEY (use_case, run_id, source_id)
);
CREATE INDEX IF NOT EXISTS review_queue_status_idx ON review_queue (use_case, status);
