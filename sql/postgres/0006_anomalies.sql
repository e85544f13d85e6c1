-- The anomalies read model: the inferencer's results (`inference.result` on the `inferences`
-- topic) labelled `anomaly`, one row per inference event, keyed by `version` first like every
-- read model of 0003.
--
-- Only results labelled `anomaly` are stored. Every reading is scored, so storing the `normal`
-- ones too would double the size of `readings` for rows nobody looks at; the projector counts
-- them and moves on.
--
-- `event_id` is the inference event's id, derived from the scored reading and the model
-- (docs/schemas.md, "Derived ids"), so a redelivered or re-emitted result is stored once.
-- `at` is the scored reading's device time (the inference event's `occurred_at`);
-- `projected_at` is when the projector stored the row. `features` is the model's feature map
-- (name to value) as a JSON object.
--
-- A plain table, not time-partitioned like `readings`: anomalies are a small fraction of the
-- readings. The projector's retention deletes rows older than its retention by `at`.
CREATE TABLE anomalies (
    version        integer          NOT NULL,
    event_id       uuid             NOT NULL,
    input_event_id uuid             NOT NULL,
    device_id      text             NOT NULL,
    at             timestamptz      NOT NULL,
    score          double precision NOT NULL,
    threshold      double precision NOT NULL,
    model_name     text             NOT NULL,
    model_version  text             NOT NULL,
    features       jsonb            NOT NULL DEFAULT '{}',
    site           text,
    projected_at   timestamptz      NOT NULL,
    PRIMARY KEY (version, event_id)
);

CREATE INDEX anomalies_device_at_idx ON anomalies (version, device_id, at);
CREATE INDEX anomalies_at_idx ON anomalies (version, at);
