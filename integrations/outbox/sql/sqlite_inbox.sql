-- The consumer-side inbox: one row per (consumer, event id) already handled.
CREATE TABLE IF NOT EXISTS {table} (
    consumer  TEXT NOT NULL,
    event_id  TEXT NOT NULL,
    received  REAL NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS {name}_received ON {table} (received);
