-- The Sluice store on PostgreSQL: event store, outbox, consumer offsets, DLQ.
-- Applied by `sluice migrate --store postgres://...` (sqlx migrations, under an advisory lock).
-- See docs/store.md for the design.

-- Event store: append-only, range-partitioned by ingested_at. The store creates the range
-- partitions (ahead of time, and on demand); the default partition only catches appends whose
-- time no range partition covers. Positions come from this sequence, in batch order.
CREATE SEQUENCE events_position_seq AS bigint;

CREATE TABLE events (
    position       bigint      NOT NULL,
    event_id       uuid        NOT NULL,
    event_type     text        NOT NULL,
    aggregate_id   text        NOT NULL,
    occurred_at    timestamptz NOT NULL,
    ingested_at    timestamptz NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    schema_version bigint
) PARTITION BY RANGE (ingested_at);

CREATE TABLE events_default PARTITION OF events DEFAULT;

-- The only index: positions are sequential, so it costs little. An index on aggregate_id
-- would cost about as much as the whole insert (random inserts across every device); reads by
-- aggregate are replays, bounded by time and so by partition.
CREATE INDEX events_position_idx ON events (position);

-- Append-only: retention drops whole partitions (or deletes from the default partition);
-- nothing ever rewrites an event.
CREATE FUNCTION sluice_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event store is append-only: UPDATE of events is not allowed';
END;
$$;

CREATE TRIGGER events_append_only BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION sluice_events_append_only();

-- A partitioned table cannot have a unique index without the partition key, so event-id
-- uniqueness lives here, written in the same transaction as the events and pruned with
-- retention. It also finds an event by id without scanning every partition.
CREATE TABLE event_ids (
    event_id    uuid        PRIMARY KEY,
    ingested_at timestamptz NOT NULL,
    position    bigint      NOT NULL
);

-- Outbox: one row per newly appended event, deleted once the relay published it. The relay
-- reads whatever rows remain in id order, so a transaction that commits late is never skipped.
-- Rows come and go quickly, hence vacuum by row count rather than by table fraction.
CREATE TABLE outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid        NOT NULL,
    aggregate_id text        NOT NULL,
    topic        text        NOT NULL,
    key          bytea       NOT NULL,
    value        bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);

-- Offsets committed in the same transaction as the writes they produced.
CREATE TABLE consumer_offsets (
    group_id    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL CHECK (partition >= 0),
    next_offset bigint      NOT NULL CHECK (next_offset >= 0),
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (group_id, topic, partition)
);

-- Dead letters: poison messages with their raw bytes and provenance.
CREATE TABLE dlq (
    dlq_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    processor         text        NOT NULL,
    event_id          uuid,
    source_topic      text        NOT NULL,
    source_partition  integer     NOT NULL,
    source_offset     bigint      NOT NULL,
    schema_id         bigint,
    raw               bytea       NOT NULL,
    decoded           jsonb,
    error_class       text        NOT NULL,
    error_message     text        NOT NULL,
    failed_at         timestamptz NOT NULL,
    attempts          integer     NOT NULL,
    status            text        NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'replayed', 'discarded')),
    status_changed_by text,
    status_changed_at timestamptz
);

CREATE INDEX dlq_failed_at_idx ON dlq (failed_at);
CREATE INDEX dlq_processor_idx ON dlq (processor, status, failed_at);
