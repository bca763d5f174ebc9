DROP TRIGGER outbox_notify_on_insert ON outbox;
DROP FUNCTION outbox_notify();
DROP TABLE outbox;
