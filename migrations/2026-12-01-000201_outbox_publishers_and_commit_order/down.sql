DROP TABLE outbox_pruned;
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('outbox', NEW.id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
DROP INDEX outbox_pending;
CREATE INDEX outbox_pending ON outbox (next_attempt_at, id) WHERE published_at IS NULL;
DROP INDEX outbox_stream;
ALTER TABLE outbox DROP COLUMN tx_id;
ALTER TABLE outbox DROP COLUMN publisher;
