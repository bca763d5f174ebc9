ALTER TABLE orders
    DROP CONSTRAINT orders_refund_status_complete,
    DROP CONSTRAINT orders_refund_status_known,
    DROP COLUMN refund_status_at,
    DROP COLUMN refund_failure_reason;
