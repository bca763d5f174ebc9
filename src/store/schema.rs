// Written to match migrations/; keep the two in step. Columns of types
// Diesel has no mapping for (`outbox.tx_id`, `outbox_pruned`, both xid8) are
// left out here and read with SQL in `outbox.rs`.

diesel::table! {
    orders (id) {
        id -> Uuid,
        payment_id -> Text,
        amount_cents -> Int8,
        customer_email -> Text,
        shipping_address -> Nullable<Text>,
        state -> Text,
        version -> Int8,
        refund_status -> Nullable<Text>,
        refund_failure_reason -> Nullable<Text>,
        refund_status_at -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    outbox (id) {
        id -> Int8,
        event_id -> Uuid,
        event_type -> Text,
        event_version -> Int4,
        aggregate_type -> Text,
        aggregate_id -> Text,
        aggregate_version -> Int8,
        content_type -> Text,
        payload -> Jsonb,
        correlation_id -> Nullable<Text>,
        occurred_at -> Timestamptz,
        published_at -> Nullable<Timestamptz>,
        attempts -> Int4,
        last_error -> Nullable<Text>,
        next_attempt_at -> Timestamptz,
        publisher -> Text,
    }
}

diesel::table! {
    processed_messages (consumer, message_id) {
        consumer -> Text,
        message_id -> Uuid,
        processed_at -> Timestamptz,
    }
}

diesel::table! {
    refunds (id) {
        id -> Uuid,
        order_id -> Uuid,
        event_id -> Uuid,
        payment_id -> Text,
        amount_cents -> Int8,
        gateway_refund_id -> Text,
        status -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    dead_letter_actions (id) {
        id -> Int8,
        action -> Text,
        queue -> Text,
        target_queue -> Nullable<Text>,
        message_id -> Nullable<Text>,
        event_type -> Nullable<Text>,
        order_id -> Nullable<Text>,
        error_kind -> Nullable<Text>,
        last_error -> Nullable<Text>,
        attempts -> Nullable<Int8>,
        outcome -> Text,
        operator -> Text,
        headers -> Jsonb,
        body -> Bytea,
        acted_at -> Timestamptz,
    }
}

diesel::table! {
    shipments (order_id) {
        order_id -> Uuid,
        shipping_address -> Text,
        applied_version -> Int8,
        updated_at -> Timestamptz,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    dead_letter_actions,
    orders,
    outbox,
    processed_messages,
    refunds,
    shipments
);
