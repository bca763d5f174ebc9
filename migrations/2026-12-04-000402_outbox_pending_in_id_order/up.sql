-- The relay asks for a publisher's oldest pending rows in id order. The old
-- index (publisher, next_attempt_at, id) could not hand them over in that
-- order, so the planner either sorted every pending row (a backlog of
-- 100,000 rows sorted on every step) or walked the primary key through every
-- published row, filtering them out: a step cost grew with the table (20 ms at
-- 30,000 rows, measured), and the bench slowed down with every repetition.
-- This index is the pending rows in the order the relay wants them; the
-- rows not yet due (backing off after a failure) are few and filtered.
DROP INDEX outbox_pending;
CREATE INDEX outbox_pending ON outbox (publisher, id) WHERE published_at IS NULL;

-- The outbox changes fast (every row is inserted, then marked published):
-- analyze and vacuum it after a fixed number of changes instead of a share of
-- a table that keeps growing, so the planner's idea of how many rows are
-- pending stays close to the truth and dead index entries do not pile up.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 5000
);
