-- Operator commands: dead letters keep what a re-drive needs (the record's key and headers) and
-- why they were discarded; every operator change is audited; replays are jobs; projections
-- have versions, one of them live.

ALTER TABLE dlq ADD COLUMN raw_key bytea;
-- The record's headers as a JSON array of [key, value] (values as UTF-8 text).
ALTER TABLE dlq ADD COLUMN headers jsonb NOT NULL DEFAULT '[]';
ALTER TABLE dlq ADD COLUMN reason text;

-- Append-only record of every change an operator made: who, what, to which target.
CREATE TABLE audit_log (
    audit_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       timestamptz NOT NULL,
    who      text        NOT NULL,
    action   text        NOT NULL,
    target   text        NOT NULL,
    detail   jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_target_idx ON audit_log (target, audit_id);

-- Replays from the event store. `cursor` is the last position done: a resumed job continues
-- after it. `heartbeat_at` tells a crashed job (stale) from a running one.
CREATE TABLE replay_jobs (
    job_id       text        PRIMARY KEY,
    created_by   text        NOT NULL,
    created_at   timestamptz NOT NULL,
    selection    jsonb       NOT NULL,
    target       text        NOT NULL,
    state        text        NOT NULL
                 CHECK (state IN ('running', 'cancelling', 'done', 'failed', 'cancelled')),
    total        bigint      NOT NULL DEFAULT 0,
    done         bigint      NOT NULL DEFAULT 0,
    cursor       bigint      NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    finished_at  timestamptz,
    error        text
);

-- Versions of a projection. At most one is live (what readers see), at most one is being
-- built beside it by a rebuild job; writers write to both.
CREATE TABLE projection_versions (
    projection text        NOT NULL,
    version    integer     NOT NULL,
    state      text        NOT NULL CHECK (state IN ('live', 'building', 'retired')),
    job_id     text,
    changed_at timestamptz NOT NULL,
    PRIMARY KEY (projection, version)
);
CREATE UNIQUE INDEX projection_versions_live_idx ON projection_versions (projection)
    WHERE state = 'live';
CREATE UNIQUE INDEX projection_versions_building_idx ON projection_versions (projection)
    WHERE state = 'building';
