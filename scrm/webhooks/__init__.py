"""Signed outbound webhooks: events written to an outbox with the change they tell of (events), the
subscriptions that receive them (subscriptions), the worker that posts them (delivery) and the delivery
log and replays (log)."""
