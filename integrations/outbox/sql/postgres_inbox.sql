-- The consumer-side inbox: one row per (consumer, event id) already handled.
CREATE TABLE IF NOT EXISTS {table} (
    consumer  text             NOT NULL,
    event_id  uuid             NOT NULL,
    received  double precision NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS {name}_received ON {table} (received);
