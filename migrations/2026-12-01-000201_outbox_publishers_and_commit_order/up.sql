-- One outbox, two publishers. Each bounded context writes its events in the
-- same transaction as its own change and has its own relay, exchange and
-- broker user: the order service (`orders`) and the refund context
-- (`refunds`). Rows written before this migration are the order service's.
ALTER TABLE outbox
    ADD COLUMN publisher text NOT NULL DEFAULT 'orders'
        CHECK (publisher IN ('orders', 'refunds'));

-- The writing transaction's id. Ids come from a sequence when a row is
-- inserted, not when it commits, so a reader that resumes "after id N" can
-- miss a row with a smaller id whose transaction committed late. The event
-- API therefore serves rows in (tx_id, id) order and only those whose
-- transaction is older than every transaction still running: nothing can
-- ever appear before what it has served. (Rows already here get this
-- migration's own id: they are all committed.)
ALTER TABLE outbox
    ADD COLUMN tx_id xid8 NOT NULL DEFAULT pg_current_xact_id();

-- The event API reads one publisher's rows in (tx_id, id) order.
CREATE INDEX outbox_stream ON outbox (publisher, tx_id, id);

-- Each relay looks only at its own publisher's pending rows.
DROP INDEX outbox_pending;
CREATE INDEX outbox_pending ON outbox (publisher, next_attempt_at, id) WHERE published_at IS NULL;

-- Wake only the relay of the row's publisher: channel `outbox_<publisher>`.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('outbox_' || NEW.publisher, NEW.id::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

-- How far each publisher's history was pruned (`courier outbox prune`): every
-- row up to and including (tx_id, id) is gone. A reader whose offset is behind
-- it is answered 410 Gone instead of being handed a history with a hole.
CREATE TABLE outbox_pruned (
    publisher   text        PRIMARY KEY,
    tx_id       xid8        NOT NULL,
    id          bigint      NOT NULL,
    rows_pruned bigint      NOT NULL,
    pruned_at   timestamptz NOT NULL DEFAULT now()
);
