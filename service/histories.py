"""Per-user interaction histories: item ids, oldest first, capped at the most recent N.

Redis key layout (defined here and nowhere else; PREFIX is CLLM4REC_REDIS_KEY_PREFIX, "cllm4rec:"):

    PREFIX history:<user_id>   list of item ids, oldest first. Appends RPUSH then LTRIM to the last
                               HISTORY_MAX_LENGTH, in one MULTI, so the list never exceeds the cap.
    PREFIX seeded              model_version of the checkpoint whose training histories were copied
                               in (absent: never seeded, or Redis lost its data)

Item ids are stored as given, known to the model or not: the store is the event log, and the model
that reads it decides what it understands (a retrained model may know today's unknown items).

Seeding copies a checkpoint's training histories into users that have no key yet and never touches
an existing key, so it is idempotent and keeps online events; several replicas seeding at once
are safe because the check-and-write is one Lua script per user.

Every Redis call has a timeout and no retries: a Redis that is down or stuck turns into
HistoryStoreUnavailable (503) within CLLM4REC_REDIS_TIMEOUT_S, never a hanging request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from service import metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

HISTORY_KEY = "history:"
SEEDED_KEY = "seeded"
SEED_CHUNK_USERS = 500  # users per pipeline while seeding
SEED_TIMEOUT_S = 30.0  # per chunk: seeding runs at start-up or from the CLI, not under a request

# KEYS[1] = history key, ARGV = item ids. Writes only a user who has no history yet.
PUSH_IF_ABSENT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('RPUSH', KEYS[1], unpack(ARGV))
return 1
"""


class HistoryStoreUnavailable(RuntimeError):
    """The history store did not answer (in time); the message says which call failed and why."""


class HistoryStore(Protocol):
    async def get(self, user_ids: Sequence[str]) -> list[list[str]]:
        """The histories of several users in one round trip, oldest first ([] for a user without one)."""

    async def append(self, user_id: str, item_ids: Sequence[str]) -> int:
        """Append events; returns the history's length afterwards (capped)."""

    async def seed(self, histories: Iterable[tuple[str, Sequence[str]]], version: str) -> int:
        """Write the histories of users who have none, mark the store seeded by `version`; returns the
        number of users written."""

    async def seeded_version(self) -> str | None: ...

    async def ping(self) -> None:
        """Raises HistoryStoreUnavailable when the store cannot answer."""

    async def close(self) -> None: ...


class RedisHistoryStore:
    def __init__(self, url: str, key_prefix: str, max_length: int, timeout_s: float):
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                          socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self.prefix = key_prefix
        self.max_length = max_length
        self.timeout_s = timeout_s
        self.push_if_absent = self.redis.register_script(PUSH_IF_ABSENT)

    def history_key(self, user_id: str) -> str:
        return f"{self.prefix}{HISTORY_KEY}{user_id}"

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]], timeout_s: float | None = None) -> T:
        started = time.perf_counter()
        try:
            # The socket timeouts bound each read and connect; this bounds the whole call.
            return await asyncio.wait_for(call(), timeout_s or self.timeout_s)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as e:
            raise HistoryStoreUnavailable(f"history store (Redis) {operation} failed: "
                                          f"{str(e) or type(e).__name__}") from e
        finally:
            metrics.redis_operation_duration.labels(operation).observe(time.perf_counter() - started)

    async def get(self, user_ids: Sequence[str]) -> list[list[str]]:
        if len(user_ids) == 1:
            return [await self._call("get", lambda: self.redis.lrange(self.history_key(user_ids[0]), 0, -1))]

        async def get_many():
            pipe = self.redis.pipeline(transaction=False)
            for user_id in user_ids:
                pipe.lrange(self.history_key(user_id), 0, -1)
            return await pipe.execute()
        return await self._call("get_many", get_many)

    async def append(self, user_id: str, item_ids: Sequence[str]) -> int:
        key = self.history_key(user_id)

        async def push_and_trim():
            pipe = self.redis.pipeline(transaction=True)
            pipe.rpush(key, *item_ids)
            pipe.ltrim(key, -self.max_length, -1)
            length, _ = await pipe.execute()
            return min(length, self.max_length)
        return await self._call("append", push_and_trim)

    async def seed(self, histories: Iterable[tuple[str, Sequence[str]]], version: str) -> int:
        written = 0
        chunk: list[tuple[str, Sequence[str]]] = []

        async def flush():
            pipe = self.redis.pipeline(transaction=False)
            for user_id, item_ids in chunk:
                await self.push_if_absent(keys=[self.history_key(user_id)], args=list(item_ids)[-self.max_length:],
                                          client=pipe)
            return sum(await pipe.execute())

        for user_id, item_ids in histories:
            if len(item_ids):
                chunk.append((user_id, item_ids))
            if len(chunk) == SEED_CHUNK_USERS:
                written += await self._call("seed", flush, SEED_TIMEOUT_S)
                chunk = []
        if chunk:
            written += await self._call("seed", flush, SEED_TIMEOUT_S)
        await self._call("seed", lambda: self.redis.set(self.prefix + SEEDED_KEY, version))
        return written

    async def seeded_version(self) -> str | None:
        return await self._call("seeded_version", lambda: self.redis.get(self.prefix + SEEDED_KEY))

    async def ping(self) -> None:
        await self._call("ping", self.redis.ping)

    async def close(self) -> None:
        await self.redis.aclose()


class InProcessHistoryStore:
    """The same behaviour in this process's memory: one server process, histories lost on exit."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.histories: dict[str, deque[str]] = {}
        self.version: str | None = None

    async def get(self, user_ids: Sequence[str]) -> list[list[str]]:
        return [list(self.histories.get(user_id, ())) for user_id in user_ids]

    async def append(self, user_id: str, item_ids: Sequence[str]) -> int:
        history = self.histories.setdefault(user_id, deque(maxlen=self.max_length))
        history.extend(item_ids)
        return len(history)

    async def seed(self, histories: Iterable[tuple[str, Sequence[str]]], version: str) -> int:
        written = 0
        for user_id, item_ids in histories:
            if len(item_ids) and user_id not in self.histories:
                self.histories[user_id] = deque(item_ids, maxlen=self.max_length)
                written += 1
        self.version = version
        return written

    async def seeded_version(self) -> str | None:
        return self.version

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


def checkpoint_histories(checkpoint) -> Iterable[tuple[str, list[str]]]:
    """(user id, item ids oldest first) of every user's training interactions in a checkpoint."""
    item_ids = checkpoint.item_ids
    for user_id, items in zip(checkpoint.user_ids, checkpoint.split.train):
        yield user_id, [item_ids[i] for i in items.tolist()]


async def seed_from_checkpoint(store: HistoryStore, checkpoint) -> None:
    """Copy the checkpoint's training histories in, unless this checkpoint's are there already.
    Never raises for an unreachable store: serving goes on, and the server tries again later."""
    try:
        if await store.seeded_version() == checkpoint.model_version:
            return
        started = time.perf_counter()
        written = await store.seed(checkpoint_histories(checkpoint), checkpoint.model_version)
        log.info("history store seeded from %s: %d users written (users with a history kept theirs) in %.1f s",
                 checkpoint.path, written, time.perf_counter() - started)
    except HistoryStoreUnavailable as e:
        log.warning("history store not seeded yet (will retry): %s", e)


def open_history_store(redis_url: str | None, key_prefix: str, max_length: int, timeout_s: float) -> HistoryStore:
    """Redis when a URL is configured, else the in-process store. Connecting is lazy: this never fails
    because Redis is down (readiness and requests report that)."""
    if redis_url:
        return RedisHistoryStore(redis_url, key_prefix, max_length, timeout_s)
    return InProcessHistoryStore(max_length)
