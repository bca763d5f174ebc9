-- What operators did to dead letters (`courier dlq replay` and `purge`), one
-- row per message. A purged message's headers and body are kept here: purging
-- empties the queue, never the record of what was in it.
CREATE TABLE dead_letter_actions (
    id           bigserial   PRIMARY KEY,
    action       text        NOT NULL CHECK (action IN ('replay', 'purge')),
    queue        text        NOT NULL,
    -- Where a replay sent the message (the work queue); null for a purge.
    target_queue text,
    message_id   text,
    event_type   text,
    order_id     text,
    error_kind   text,
    last_error   text,
    attempts     bigint,
    -- What the operator was told, e.g. that the refund had already happened.
    outcome      text        NOT NULL,
    operator     text        NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}',
    body         bytea       NOT NULL,
    acted_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letter_actions_message ON dead_letter_actions (message_id);
