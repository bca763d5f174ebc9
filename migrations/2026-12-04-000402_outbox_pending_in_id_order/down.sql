ALTER TABLE outbox RESET (
    autovacuum_vacuum_scale_factor,
    autovacuum_vacuum_threshold,
    autovacuum_analyze_scale_factor,
    autovacuum_analyze_threshold
);
DROP INDEX outbox_pending;
CREATE INDEX outbox_pending ON outbox (publisher, next_attempt_at, id) WHERE published_at IS NULL;
