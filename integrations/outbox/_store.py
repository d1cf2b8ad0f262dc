"""What both outbox stores share: the protocol, the operations, and the rules of a claim.

A dialect supplies its SQL text and a way to run statements in one transaction; every
operation is written once, in ``_async_store.py`` (the sync twin is generated). The rules,
in SQL terms:

* A row is *ready* when it is pending, its ``available_at`` has come and no live lease
  holds it.
* A claim takes ready rows in id order whose earlier pending rows of the same key are all
  ready too (so they are in the same claim, ahead of it). A key whose head is leased,
  backing off or released after an outage therefore blocks its later rows, which wait
  without touching their attempts. Dead rows do not block their key.
* There is no high-water mark: a claim walks the pending rows from the lowest id (as far
  as it needs), so a row that commits after rows with higher ids is claimed like any other.
* Every write-back names the claim's owner token; a relay whose lease ran out and was
  taken over changes nothing.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from resilience.integrations.outbox._async_store import AsyncOutboxStore, AsyncStoreOps
from resilience.integrations.outbox._sync_store import SyncOutboxStore, SyncStoreOps

__all__ = ["OutboxStore", "SqlStore"]


@runtime_checkable
class OutboxStore(SyncOutboxStore, AsyncOutboxStore, Protocol):
    """What a publisher needs from a store. Both stores also offer ``enqueue``."""


class SqlStore(SyncStoreOps, AsyncStoreOps):
    """The operations of an outbox store over a dialect's SQL."""
