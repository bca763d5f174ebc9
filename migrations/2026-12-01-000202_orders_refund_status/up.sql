-- What the refund context reported of an order's refund (`refund.completed`,
-- `refund.failed`), set by the order service's `orders.refund-status` worker.
-- `refunded` is final; `refund_failed` carries the reason for a person to
-- read. Not an order change: `version` is left alone.
ALTER TABLE orders
    ADD COLUMN refund_failure_reason text,
    ADD COLUMN refund_status_at timestamptz,
    ADD CONSTRAINT orders_refund_status_known
        CHECK (refund_status IN ('refunded', 'refund_failed')),
    ADD CONSTRAINT orders_refund_status_complete
        CHECK ((refund_status IS NULL) = (refund_status_at IS NULL));
