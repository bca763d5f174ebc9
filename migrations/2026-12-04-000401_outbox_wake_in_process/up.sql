-- The relays are woken in their own process after a commit (src/outbox/wake.rs)
-- and poll for the rest. NOTIFY is gone from the commit path: a notifying
-- transaction holds one cluster-wide lock from its pre-commit through its WAL
-- flush, so every commit that wrote an outbox row waited for the previous
-- one's flush (the most common wait event under load).
DROP TRIGGER outbox_notify_on_insert ON outbox;
DROP FUNCTION outbox_notify();
