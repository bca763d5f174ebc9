-- The transactional outbox and event store. A row is written in the same
-- transaction as the change it describes; the relay publishes it and sets
-- `published_at` only after the broker confirmed it. Rows are kept after
-- publishing: `id` is the global order and the event API's offset.
CREATE TABLE outbox (
    id                bigserial   PRIMARY KEY,
    event_id          uuid        NOT NULL UNIQUE,
    event_type        text        NOT NULL,
    event_version     integer     NOT NULL,
    aggregate_type    text        NOT NULL,
    aggregate_id      text        NOT NULL,
    aggregate_version bigint      NOT NULL,
    content_type      text        NOT NULL DEFAULT 'application/json',
    payload           jsonb       NOT NULL,
    correlation_id    text,
    occurred_at       timestamptz NOT NULL,
    published_at      timestamptz,
    attempts          integer     NOT NULL DEFAULT 0,
    last_error        text,
    next_attempt_at   timestamptz NOT NULL DEFAULT now()
);

-- The relay only ever looks at pending rows; keep that lookup small however
-- long the published history grows.
CREATE INDEX outbox_pending ON outbox (next_attempt_at, id) WHERE published_at IS NULL;

-- Wake the relay at commit time; it polls as well, so a lost notification only
-- delays a publish by one poll interval.
CREATE FUNCTION outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('outbox', NEW.id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER outbox_notify_on_insert
    AFTER INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_notify();
