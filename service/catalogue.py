"""The live catalogue: which of the checkpoint's items may be recommended right now.

An item retired (DELETE /items/{item_id}, or PATCH with "available": false) is left out of every
recommendation from the next request on, on every replica: the retired ids live in the history
store's Redis (or in the process, without Redis), with a version number that each change
increments. A replica reads the version before each recommendation (one GET) and re-reads the set
only when it changed.

Redis keys (PREFIX is CLLM4REC_REDIS_KEY_PREFIX, as in service/histories.py):

    PREFIX catalogue:retired   set of retired item ids
    PREFIX catalogue:version   incremented (INCR) with every change of the set

When Redis does not answer, a replica keeps serving with the set it read last (retirements made
meanwhile reach it once Redis is back), rather than failing recommendations over a business rule.
"""

from __future__ import annotations

import logging

from service import metrics
from service.histories import HistoryStore, HistoryStoreUnavailable, RedisHistoryStore

log = logging.getLogger(__name__)

RETIRED_KEY = "catalogue:retired"
VERSION_KEY = "catalogue:version"


class Catalogue:
    """Retired item ids, shared through the history store's Redis when there is one."""

    def __init__(self, store: HistoryStore):
        self.redis = store.redis if isinstance(store, RedisHistoryStore) else None
        self.call = store.call if isinstance(store, RedisHistoryStore) else None
        self.prefix = store.prefix if isinstance(store, RedisHistoryStore) else ""
        self.retired: frozenset[str] = frozenset()
        self.version: str | None = None

    async def set_available(self, item_id: str, available: bool) -> None:
        """Raises HistoryStoreUnavailable when Redis does not take the change (the caller retries)."""
        if self.redis is None:
            self.retired = self.retired - {item_id} if available else self.retired | {item_id}
            metrics.retired_items.set(len(self.retired))
            return

        async def change():
            pipe = self.redis.pipeline(transaction=True)
            (pipe.srem if available else pipe.sadd)(self.prefix + RETIRED_KEY, item_id)
            pipe.incr(self.prefix + VERSION_KEY)
            await pipe.execute()
        await self.call("catalogue", change)
        await self.refresh()

    async def refresh(self) -> frozenset[str]:
        """The retired ids, re-read only when another replica (or this one) changed them."""
        if self.redis is None:
            return self.retired
        try:
            version = await self.call("catalogue", lambda: self.redis.get(self.prefix + VERSION_KEY))
            if version != self.version:
                members = await self.call("catalogue", lambda: self.redis.smembers(self.prefix + RETIRED_KEY))
                self.retired, self.version = frozenset(members), version
                metrics.retired_items.set(len(self.retired))
        except HistoryStoreUnavailable as e:
            log.warning("retired items not refreshed, serving with the last %d known: %s", len(self.retired), e)
        return self.retired
