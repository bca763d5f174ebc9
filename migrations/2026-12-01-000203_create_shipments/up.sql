-- The shipping-sync worker's read model: where each order ships to, as of
-- the newest `order.shipping-info-changed` it has applied. A change is
-- applied only if its order version is newer than `applied_version`, so the
-- last write wins whatever order the events arrive in.
CREATE TABLE shipments (
    order_id         uuid        PRIMARY KEY,
    shipping_address text        NOT NULL,
    applied_version  bigint      NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
