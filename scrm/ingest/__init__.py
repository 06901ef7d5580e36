"""Ingest: an inbound event is acknowledged once durable, and its effects are applied in batches behind it.

The webhook path appends the event to the journal (:mod:`scrm.ingest.journal`: one row, group-committed,
deduplicated by the platform's id) and may answer the platform as soon as that commits; the consumer
(:mod:`scrm.ingest.consumer`, in worker instances) applies committed events in id order, in large
batches, through :func:`scrm.pipeline.handle_batch`, marking each applied in the transaction that writes
its effects. Channels that answer with a passive reply wait for the application (``Accepted.applied``);
the others need only ``Accepted.durable``.
"""

from scrm.ingest.consumer import Consumer
from scrm.ingest.journal import Accepted, Journal

__all__ = ["Accepted", "Consumer", "Journal"]
