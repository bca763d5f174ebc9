-- The order service's aggregate. `version` grows with every change and is
-- carried by every event, so consumers can order what they apply.
CREATE TABLE orders (
    id               uuid        PRIMARY KEY,
    payment_id       text        NOT NULL,
    amount_cents     bigint      NOT NULL CHECK (amount_cents > 0),
    customer_email   text        NOT NULL,
    shipping_address text,
    state            text        NOT NULL CHECK (state IN ('placed', 'shipped', 'canceled')),
    version          bigint      NOT NULL CHECK (version >= 1),
    refund_status    text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);
