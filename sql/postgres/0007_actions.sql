-- The executor's durable action schedule and its ledger ("Actions fire once", docs/store.md).
--
-- `actions` holds one row per dedup key (input event id, rule id, rule version, endpoint): a
-- request whose key is already here is a duplicate and is never stored again, so restarts and
-- replays cannot deliver twice. `action_id` is the id of the `action.requested` event that
-- created the row. A pending action waits for `next_attempt_at`; a claim pushes that time
-- forward by a lease, so two executors never attempt it at once (`FOR UPDATE SKIP LOCKED`).
-- Rows that left `pending` have no next attempt. `source_*` is where the request was consumed
-- (the provenance of its dead letter, should delivery give up). `destructive` and `body` are
-- the request's; `body` is the JSON text to POST.
--
-- `action_ledger` has one row per attempt or decision, in id order: intake decisions
-- (`denied`, `suppressed`, `duplicate`, attempt 0) and attempts (`delivered`, `retrying`,
-- `dead`, `short_circuited`, and `failed` for a failed attempt recorded after the action had
-- already left `pending`). A `duplicate` row is written against the action that holds the key;
-- `request_id` is then the id of the request that was absorbed.
--
-- No foreign key from the ledger to `actions` (none on SQLite either): retention deletes both
-- in one statement. Retention (`Store::maintain`) removes finished actions (every status but
-- `pending`) whose last change is older than the store's retention, with their ledger rows.
CREATE TABLE actions (
    action_id        uuid        PRIMARY KEY,
    input_event_id   uuid        NOT NULL,
    rule_id          text        NOT NULL,
    rule_version     integer     NOT NULL,
    endpoint         text        NOT NULL,
    device_id        text        NOT NULL,
    body             text        NOT NULL,
    destructive      boolean     NOT NULL,
    requested_at     timestamptz NOT NULL,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    status           text        NOT NULL
                     CHECK (status IN ('pending', 'delivered', 'dead', 'denied', 'suppressed')),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    next_attempt_at  timestamptz,
    last_error       text,
    last_http_status integer,
    updated_at       timestamptz NOT NULL,
    delivered_at     timestamptz,
    CONSTRAINT actions_dedup_key UNIQUE (input_event_id, rule_id, rule_version, endpoint),
    CONSTRAINT actions_pending_have_a_time CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL))
);

-- The schedule: due pending actions, oldest first.
CREATE INDEX actions_due_idx ON actions (next_attempt_at, action_id) WHERE status = 'pending';
-- Retention of finished actions.
CREATE INDEX actions_finished_idx ON actions (updated_at) WHERE status <> 'pending';

CREATE TABLE action_ledger (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    action_id   uuid        NOT NULL,
    request_id  uuid,
    endpoint    text        NOT NULL,
    attempt     integer     NOT NULL CHECK (attempt >= 0),
    outcome     text        NOT NULL
                CHECK (outcome IN ('delivered', 'failed', 'retrying', 'denied', 'short_circuited',
                                   'suppressed', 'duplicate', 'dead')),
    http_status integer,
    latency_ms  bigint      CHECK (latency_ms >= 0),
    error       text,
    at          timestamptz NOT NULL
);

CREATE INDEX action_ledger_action_idx ON action_ledger (action_id, id);
CREATE INDEX action_ledger_at_idx ON action_ledger (at);
