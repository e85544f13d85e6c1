-- The Sluice store on SQLite: event store, outbox, consumer offsets, DLQ.
-- Applied by `sluice migrate --store sqlite://PATH` inside one BEGIN IMMEDIATE transaction, so two
-- processes migrating at once take turns. See docs/store.md for the design.
--
-- Timestamps are INTEGER microseconds since the Unix epoch (UTC): exact, and ordered by value.
-- Ids are TEXT UUIDs (hyphenated, lowercase) so they read the same as on Postgres.

-- Event store: append-only. The store gives positions in batch order, after the highest ever
-- given: AUTOINCREMENT keeps that in sqlite_sequence even when retention deleted the newest rows.
CREATE TABLE events (
    position       INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT    NOT NULL UNIQUE,
    event_type     TEXT    NOT NULL,
    aggregate_id   TEXT    NOT NULL,
    occurred_at    INTEGER NOT NULL,
    ingested_at    INTEGER NOT NULL,
    payload        TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    schema_version INTEGER
);

-- For retention and time ranges. No index on aggregate_id: it would cost as much as the
-- insert itself; reads by aggregate are replays, bounded by time.
CREATE INDEX events_ingested_at_idx ON events (ingested_at);

CREATE TRIGGER events_append_only BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'the event store is append-only: UPDATE of events is not allowed');
END;

-- Outbox: one row per newly appended event, deleted once the relay published it.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT    NOT NULL,
    aggregate_id TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    key          BLOB    NOT NULL,
    value        BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT
);

-- Offsets committed in the same transaction as the writes they produced.
CREATE TABLE consumer_offsets (
    group_id    TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL CHECK (partition >= 0),
    next_offset INTEGER NOT NULL CHECK (next_offset >= 0),
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);

-- Dead letters: poison messages with their raw bytes and provenance.
CREATE TABLE dlq (
    dlq_id            INTEGER PRIMARY KEY AUTOINCREMENT,
    processor         TEXT    NOT NULL,
    event_id          TEXT,
    source_topic      TEXT    NOT NULL,
    source_partition  INTEGER NOT NULL,
    source_offset     INTEGER NOT NULL,
    schema_id         INTEGER,
    raw               BLOB    NOT NULL,
    decoded           TEXT,
    error_class       TEXT    NOT NULL,
    error_message     TEXT    NOT NULL,
    failed_at         INTEGER NOT NULL,
    attempts          INTEGER NOT NULL,
    status            TEXT    NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'replayed', 'discarded')),
    status_changed_by TEXT,
    status_changed_at INTEGER
);

CREATE INDEX dlq_failed_at_idx ON dlq (failed_at);
CREATE INDEX dlq_processor_idx ON dlq (processor, status, failed_at);
