-- The consumers' inbox: a message id recorded here, in the same transaction
-- as the effect, is never given effect again by the same consumer.
CREATE TABLE processed_messages (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);
