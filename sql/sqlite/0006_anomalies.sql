-- The anomalies read model: the inferencer's results (`inference.result` on the `inferences`
-- topic) labelled `anomaly`, one row per inference event, keyed by `version` first like every
-- read model of 0003. Times are INTEGER microseconds since the Unix epoch (UTC), ids TEXT
-- UUIDs, JSON TEXT, as in 0003. (There is no 0005 on SQLite: it partitions Postgres's
-- `readings`; the number is kept the same on both backends.)
--
-- Only results labelled `anomaly` are stored. Every reading is scored, so storing the `normal`
-- ones too would double the size of `readings` for rows nobody looks at; the projector counts
-- them and moves on.
--
-- `event_id` is the inference event's id, derived from the scored reading and the model
-- (docs/schemas.md, "Derived ids"), so a redelivered or re-emitted result is stored once.
-- `at` is the scored reading's device time (the inference event's `occurred_at`);
-- `projected_at` is when the projector stored the row. `features` is the model's feature map
-- (name to value) as a JSON object. The projector's retention deletes rows by `at`.
CREATE TABLE anomalies (
    version        INTEGER NOT NULL,
    event_id       TEXT    NOT NULL,
    input_event_id TEXT    NOT NULL,
    device_id      TEXT    NOT NULL,
    at             INTEGER NOT NULL,
    score          REAL    NOT NULL,
    threshold      REAL    NOT NULL,
    model_name     TEXT    NOT NULL,
    model_version  TEXT    NOT NULL,
    features       TEXT    NOT NULL DEFAULT '{}',
    site           TEXT,
    projected_at   INTEGER NOT NULL,
    PRIMARY KEY (version, event_id)
);

CREATE INDEX anomalies_device_at_idx ON anomalies (version, device_id, at);
CREATE INDEX anomalies_at_idx ON anomalies (version, at);
