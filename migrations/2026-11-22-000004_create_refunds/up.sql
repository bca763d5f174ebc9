-- The refund context's record: at most one refund per canceled order.
CREATE TABLE refunds (
    id                uuid        PRIMARY KEY,
    order_id          uuid        NOT NULL UNIQUE,
    event_id          uuid        NOT NULL,
    payment_id        text        NOT NULL,
    amount_cents      bigint      NOT NULL,
    gateway_refund_id text        NOT NULL,
    status            text        NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
