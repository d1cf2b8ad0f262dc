-- The outbox table for SqliteOutboxStore. {table} is replaced by the store's table name.
-- Times are Unix seconds (REAL) from the store's clock.
CREATE TABLE IF NOT EXISTS {table} (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT    NOT NULL UNIQUE,
    topic         TEXT    NOT NULL,
    key           TEXT,
    payload       TEXT    NOT NULL,
    headers       TEXT    NOT NULL DEFAULT '{}',
    created       REAL    NOT NULL,
    available_at  REAL    NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    status        TEXT    NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'published', 'dead')),
    lease_owner   TEXT,
    lease_until   REAL,
    published_at  REAL
);
-- The claim scans pending rows in id order and checks each key's earlier rows.
CREATE INDEX IF NOT EXISTS {table}_pending ON {table} (id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS {table}_pending_key ON {table} (key, id) WHERE status = 'pending';
-- Retention deletes published rows oldest first; operators list dead rows.
CREATE INDEX IF NOT EXISTS {table}_published ON {table} (published_at) WHERE status = 'published';
CREATE INDEX IF NOT EXISTS {table}_dead ON {table} (id) WHERE status = 'dead';
