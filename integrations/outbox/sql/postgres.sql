-- The outbox table for PostgresOutboxStore. {table} is the (schema-qualified) table name,
-- {name} the bare name and {channel} the LISTEN/NOTIFY channel.
-- Times are Unix seconds (double precision): the database clock unless the store was
-- given a clock, so relays on hosts with skewed clocks agree on leases.
CREATE TABLE IF NOT EXISTS {table} (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      uuid             NOT NULL UNIQUE,
    topic         text             NOT NULL,
    key           text,
    payload       json             NOT NULL,
    headers       json             NOT NULL DEFAULT '{}',
    created       double precision NOT NULL,
    available_at  double precision NOT NULL,
    attempts      integer          NOT NULL DEFAULT 0,
    last_error    text,
    status        text             NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'published', 'dead')),
    lease_owner   text,
    lease_until   double precision,
    published_at  double precision
) WITH (fillfactor = 50);
-- Half of every page left free lets a claim write each of the page's leases in place (a
-- HOT update: no new index entries); at 70 most of a batch's leases went to other pages,
-- with an entry in every index. Applies to pages that tables made earlier fill from now.
ALTER TABLE {table} SET (fillfactor = 50);
-- The claim walks pending rows in id order; the key index serves operators' queries.
CREATE INDEX IF NOT EXISTS {name}_pending ON {table} (id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS {name}_pending_key ON {table} (key, id) WHERE status = 'pending';
-- Retention deletes published rows oldest first (rows an earlier version marked 'published'
-- rather than deleting them); operators list dead rows.
CREATE INDEX IF NOT EXISTS {name}_published ON {table} (published_at) WHERE status = 'published';
CREATE INDEX IF NOT EXISTS {name}_dead ON {table} (id) WHERE status = 'dead';
-- Every event id the outbox has taken, kept until purge: a published event's row is deleted
-- (a delete writes no index entries; an update to 'published' wrote one in every index,
-- and a deep backlog's indexes grew a level as it drained), and this table still refuses a
-- retried producer's duplicate. The insert of both rows is one statement; the two unique
-- indexes make the refusal hold against concurrent publishing at any isolation level.
-- A table made before this one existed gets the ids of the rows it holds.
DO $ids$
BEGIN
    IF to_regclass('{table}_ids') IS NULL THEN
        CREATE TABLE {table}_ids (
            event_id  uuid             PRIMARY KEY,
            created   double precision NOT NULL
        );
        INSERT INTO {table}_ids (event_id, created) SELECT event_id, created FROM {table};
    END IF;
END
$ids$;
-- Purge finds old ids by time: ids arrive in time order, and a BRIN index costs the insert
-- next to nothing.
CREATE INDEX IF NOT EXISTS {name}_ids_created ON {table}_ids USING brin (created);
-- A wake-up hint for idle relays: one notification per inserting statement, merged per
-- transaction by PostgreSQL. Relays poll anyway, so a lost hint only costs latency.
CREATE OR REPLACE FUNCTION {table}_notify() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('{channel}', '');
    RETURN NULL;
END
$fn$;
DROP TRIGGER IF EXISTS {name}_notify ON {table};
CREATE TRIGGER {name}_notify AFTER INSERT ON {table}
    FOR EACH STATEMENT EXECUTE FUNCTION {table}_notify();
