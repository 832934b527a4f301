"""The live catalogue: items added from their text while serving, and items retired.

An item added (POST /items) gets a token placed by its text with the function training uses to
start items from their titles (model.initialise.text_vector) and, in a head with rows of its own, the
head rows of the catalogue items with the nearest titles (model/placement.py), so the head scores it
from the next request on, without retraining. An item retired (DELETE /items/{item_id}, or PATCH with
"available": false) is left out of every recommendation from the next request on. Both hold on every
replica: the live items and the retired ids live in the history store's Redis (or in the process,
without Redis), with a version number that each change increments. A replica reads the version
before each recommendation (a GET in the same round trip as the user's history) and re-reads the rest
only when it changed: the retired set, and the live items only when there are more or fewer of them.

Redis keys (PREFIX is CLLM4REC_REDIS_KEY_PREFIX, as in service/histories.py):

    PREFIX catalogue:live      hash: item id -> JSON {"title", "description"} of each item added live
    PREFIX catalogue:retired   set of retired item ids (checkpoint or live)
    PREFIX catalogue:version   incremented (INCR) with every change of either

When Redis does not answer, a replica keeps serving with what it read last (changes made meanwhile
reach it once Redis is back), rather than failing recommendations over the catalogue.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from model.data import item_text
from service import metrics
from service.histories import HistoryStore, HistoryStoreUnavailable, RedisHistoryStore

log = logging.getLogger(__name__)

LIVE_KEY = "catalogue:live"
RETIRED_KEY = "catalogue:retired"
VERSION_KEY = "catalogue:version"


@dataclass(frozen=True)
class LiveItem:
    item_id: str
    title: str
    description: str | None = None

    @property
    def token_text(self) -> str:
        """What its token starts from: the title, as training starts items from titles first."""
        return self.title or self.description or ""

    @property
    def text(self) -> str:
        """What its head rows are placed by: title and description, as the teacher reads items."""
        return item_text(self.title, self.description)


@dataclass(frozen=True)
class CatalogueState:
    live: dict[str, LiveItem] = field(default_factory=dict)
    retired: frozenset[str] = frozenset()


class Catalogue:
    """Live items and retired ids, shared through the history store's Redis when there is one."""

    def __init__(self, store: HistoryStore):
        redis_store = store if isinstance(store, RedisHistoryStore) else None
        self.redis = redis_store.redis if redis_store else None
        self.call = redis_store.call if redis_store else None
        self.prefix = redis_store.prefix if redis_store else ""
        self.state = CatalogueState()
        self.version: str | None = None

    @property
    def version_key(self) -> str:
        return self.prefix + VERSION_KEY

    def publish(self) -> None:
        metrics.live_items.set(len(self.state.live))
        metrics.retired_items.set(len(self.state.retired))

    async def add(self, item: LiveItem) -> bool:
        """Store a live item; False when an item of that id was added before (nothing changes).
        Raises HistoryStoreUnavailable when Redis does not take it (the caller retries)."""
        if self.redis is None:
            if item.item_id in self.state.live:
                return False
            self.state = CatalogueState({**self.state.live, item.item_id: item}, self.state.retired)
            self.publish()
            return True
        record = json.dumps({"title": item.title, "description": item.description})

        async def add_if_new():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hsetnx(self.prefix + LIVE_KEY, item.item_id, record)
            pipe.incr(self.version_key)
            added, _ = await pipe.execute()
            return bool(added)
        added = await self.call("catalogue", add_if_new)
        await self.refresh()
        return added

    async def set_available(self, item_id: str, available: bool) -> None:
        """Raises HistoryStoreUnavailable when Redis does not take the change (the caller retries)."""
        if self.redis is None:
            retired = self.state.retired - {item_id} if available else self.state.retired | {item_id}
            self.state = CatalogueState(self.state.live, retired)
            self.publish()
            return

        async def change():
            pipe = self.redis.pipeline(transaction=True)
            (pipe.srem if available else pipe.sadd)(self.prefix + RETIRED_KEY, item_id)
            pipe.incr(self.version_key)
            await pipe.execute()
        await self.call("catalogue", change)
        await self.refresh()

    async def refresh(self) -> CatalogueState:
        """The live items and retired ids, re-read only when another replica (or this one) changed them."""
        if self.redis is None:
            await asyncio.sleep(0)  # a turn for the event loop, as the read from Redis gives (InProcessHistoryStore)
            return self.state
        try:
            version = await self.call("catalogue", lambda: self.redis.get(self.version_key))
        except HistoryStoreUnavailable as e:
            return self.last_read(e)
        return await self.catch_up(version)

    async def catch_up(self, version: str | None) -> CatalogueState:
        """As refresh, given the version key's value as just read (HistoryStore.get_beside)."""
        if self.redis is None or version == self.version:
            return self.state
        try:
            async def read_live_count_and_retired():
                pipe = self.redis.pipeline(transaction=True)
                pipe.hlen(self.prefix + LIVE_KEY)
                pipe.smembers(self.prefix + RETIRED_KEY)
                return await pipe.execute()
            n_live, retired = await self.call("catalogue", read_live_count_and_retired)
            live = self.state.live
            # The live hash only grows (HSETNX; a record is never rewritten), so the same count is the same
            # items: a retirement costs a replica the retired set, not every live item's JSON again (10,000
            # of each: 2.3 ms of the event loop instead of 36.9, docs/benchmarks.md). Items already read keep
            # their objects.
            if n_live != len(live):
                records = await self.call("catalogue", lambda: self.redis.hgetall(self.prefix + LIVE_KEY))
                live = {item_id: live.get(item_id) or LiveItem(item_id, **json.loads(record))
                        for item_id, record in records.items()}
            self.state = CatalogueState(live, frozenset(retired))
            self.version = version
            self.publish()
        except HistoryStoreUnavailable as e:
            return self.last_read(e)
        return self.state

    def last_read(self, error: HistoryStoreUnavailable) -> CatalogueState:
        """What a replica serves with while Redis does not answer."""
        log.warning("catalogue not refreshed, serving with the last one read: %s", error)
        return self.state
