"""Per-user interaction histories: item ids, oldest first, capped at the most recent N.

Redis key layout (defined here and nowhere else; PREFIX is CLLM4REC_REDIS_KEY_PREFIX, "cllm4rec:"):

    PREFIX history:<user_id>   list of item ids, oldest first. Appends RPUSH then LTRIM to the last
                               HISTORY_MAX_LENGTH (and EXPIRE with CLLM4REC_HISTORY_TTL_S), in one MULTI,
                               so the list never exceeds the cap.
    PREFIX seeded:<version>    set once the training histories of model <version> are merged in: each
                               model version seeds once, so two versions live at once (a rolling
                               update, a canary, a reload) never re-seed in turn
    PREFIX erased              set of user ids whose history was erased (DELETE): seeding never writes
                               their training history back

Item ids are stored as given, known to the model or not: the store is the event log, and the model
that reads it decides what it understands (a retrained model may know today's unknown items).

Seeding merges: a user's history becomes their training items (oldest first) followed by the stored
items that are not among them, in their order, capped. So events that arrived before the seed (Redis
was down or empty at start) stay after the training items, seeding twice changes nothing, and a later
model version adds its training items in front of what is stored. One Lua script per user does the
read-merge-write, so an event that arrives during seeding is never lost, and several replicas may
seed at once.

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
SEEDED_KEY = "seeded:"
ERASED_KEY = "erased"
SEED_CHUNK_USERS = 500  # users per pipeline while seeding
SEED_TIMEOUT_S = 30.0  # per chunk: seeding runs in the background or from the CLI, not under a request

# KEYS[1] = history key, KEYS[2] = erased set; ARGV = user id, cap, ttl (0: none), training items.
# Returns 1 when the history changed. Lua's unpack takes a few thousand values at most, so lists are
# pushed in slices.
MERGE_TRAINING_HISTORY = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
local cap, ttl = tonumber(ARGV[2]), tonumber(ARGV[3])
local merged, training = {}, {}
for i = 4, #ARGV do merged[#merged + 1] = ARGV[i]; training[ARGV[i]] = true end
local stored = redis.call('LRANGE', KEYS[1], 0, -1)
for _, item in ipairs(stored) do
  if not training[item] then merged[#merged + 1] = item end
end
local first = math.max(1, #merged - cap + 1)
if #merged - first + 1 == #stored then
  local same = true
  for i = first, #merged do
    if merged[i] ~= stored[i - first + 1] then same = false; break end
  end
  if same then return 0 end
end
redis.call('DEL', KEYS[1])
for i = first, #merged, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(merged, i, math.min(i + 999, #merged)))
end
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""


class HistoryStoreUnavailable(RuntimeError):
    """The history store did not answer (in time); the message says which call failed and why."""


class HistoryStore(Protocol):
    async def get(self, user_ids: Sequence[str]) -> list[list[str]]:
        """The histories of several users in one round trip, oldest first ([] for a user without one)."""

    async def get_beside(self, user_ids: Sequence[str], key: str) -> tuple[list[list[str]], str | None]:
        """The histories and one string key's value, in one round trip: a recommendation reads the
        catalogue's version (service/catalogue.py) beside its histories. None without a shared store."""

    async def append(self, user_id: str, item_ids: Sequence[str]) -> int:
        """Append events; returns the history's length afterwards (capped)."""

    async def erase(self, user_id: str) -> bool:
        """Delete the user's history and keep seeding from writing it back; True if there was one."""

    async def seed(self, histories: Iterable[tuple[str, Sequence[str]]], version: str) -> int:
        """Merge training histories in (module docstring), mark `version` seeded; returns the number of
        users whose history changed."""

    async def is_seeded(self, version: str) -> bool: ...

    async def ping(self) -> None:
        """Raises HistoryStoreUnavailable when the store cannot answer."""

    async def close(self) -> None: ...


class RedisHistoryStore:
    def __init__(self, url: str, key_prefix: str, max_length: int, timeout_s: float, ttl_s: int = 0):
        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout_s,
                                          socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self.prefix = key_prefix
        self.max_length = max_length
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self.merge_training_history = self.redis.register_script(MERGE_TRAINING_HISTORY)

    def history_key(self, user_id: str) -> str:
        return f"{self.prefix}{HISTORY_KEY}{user_id}"

    async def call(self, operation: str, call: Callable[[], Awaitable[T]], timeout_s: float | None = None) -> T:
        started = time.perf_counter()
        try:
            # The socket timeouts bound each read and connect; this bounds the whole call (a timeout
            # scope, not wait_for: that wraps the call in a task of its own, a loop turn each time).
            async with asyncio.timeout(timeout_s or self.timeout_s):
                return await call()
        except (TimeoutError, redis.RedisError, OSError) as e:
            raise HistoryStoreUnavailable(f"history store (Redis) {operation} failed: "
                                          f"{str(e) or type(e).__name__}") from e
        finally:
            metrics.redis_operation_duration.labels(operation).observe(time.perf_counter() - started)

    async def get(self, user_ids: Sequence[str]) -> list[list[str]]:
        if len(user_ids) == 1:
            return [await self.call("get", lambda: self.redis.lrange(self.history_key(user_ids[0]), 0, -1))]
        return await self.call("get_many", lambda: self.read_pipelined(user_ids))

    async def get_beside(self, user_ids: Sequence[str], key: str) -> tuple[list[list[str]], str | None]:
        # One pipeline rather than two calls side by side: one write and one read on one connection,
        # no task of its own for each (docs/benchmarks.md, "One Redis round trip a request").
        operation = "get" if len(user_ids) == 1 else "get_many"
        *histories, value = await self.call(operation, lambda: self.read_pipelined(user_ids, key))
        return histories, value

    async def read_pipelined(self, user_ids: Sequence[str], key: str | None = None) -> list:
        """The users' histories and, given `key`, that key's value after them, in one pipeline."""
        pipe = self.redis.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.lrange(self.history_key(user_id), 0, -1)
        if key is not None:
            pipe.get(key)
        return await pipe.execute()

    async def append(self, user_id: str, item_ids: Sequence[str]) -> int:
        key = self.history_key(user_id)

        async def push_and_trim():
            pipe = self.redis.pipeline(transaction=True)
            pipe.rpush(key, *item_ids)
            pipe.ltrim(key, -self.max_length, -1)
            if self.ttl_s:
                pipe.expire(key, self.ttl_s)
            length = (await pipe.execute())[0]
            return min(length, self.max_length)
        return await self.call("append", push_and_trim)

    async def erase(self, user_id: str) -> bool:
        async def delete_and_remember():
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(self.history_key(user_id))
            pipe.sadd(self.prefix + ERASED_KEY, user_id)
            deleted, _ = await pipe.execute()
            return bool(deleted)
        return await self.call("erase", delete_and_remember)

    async def seed(self, histories: Iterable[tuple[str, Sequence[str]]], version: str) -> int:
        written = 0
        chunk: list[tuple[str, Sequence[str]]] = []

        erased = self.prefix + ERASED_KEY

        async def flush():
            pipe = self.redis.pipeline(transaction=False)
            for user_id, item_ids in chunk:
                await self.merge_training_history(
                    keys=[self.history_key(user_id), erased],
                    args=[user_id, self.max_length, self.ttl_s, *list(item_ids)[-self.max_length:]], client=pipe)
            return sum(await pipe.execute())

        for user_id, item_ids in histories:
            if len(item_ids):
                chunk.append((user_id, item_ids))
            if len(chunk) == SEED_CHUNK_USERS:
                written += await self.call("seed", flush, SEED_TIMEOUT_S)
                chunk = []
        if chunk:
            written += await self.call("seed", flush, SEED_TIMEOUT_S)
        await self.call("seed", lambda: self.redis.set(self.prefix + SEEDED_KEY + version, "1"))
        return written

    async def is_seeded(self, version: str) -> bool:
        return bool(await self.call("is_seeded", lambda: self.redis.exists(self.prefix + SEEDED_KEY + version)))

    async def ping(self) -> None:
        await self.call("ping", self.redis.ping)

    async def close(self) -> None:
        await self.redis.aclose()


class InProcessHistoryStore:
    """The same behaviour in this process's memory: one server process, histories lost on exit. A read
    gives the event loop a turn, as a round trip to Redis does: requests read by the server meanwhile
    announce themselves to the batcher (Batcher.arriving) and share this one's forward pass, instead of
    each being scored alone."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.histories: dict[str, deque[str]] = {}
        self.seeded: set[str] = set()
        self.erased: set[str] = set()

    async def get(self, user_ids: Sequence[str]) -> list[list[str]]:
        await asyncio.sleep(0)
        return [list(self.histories.get(user_id, ())) for user_id in user_ids]

    async def get_beside(self, user_ids: Sequence[str], key: str) -> tuple[list[list[str]], str | None]:
        return await self.get(user_ids), None

    async def append(self, user_id: str, item_ids: Sequence[str]) -> int:
        history = self.histories.setdefault(user_id, deque(maxlen=self.max_length))
        history.extend(item_ids)
        return len(history)

    async def erase(self, user_id: str) -> bool:
        self.erased.add(user_id)
        return self.histories.pop(user_id, None) is not None

    async def seed(self, histories: Iterable[tuple[str, Sequence[str]]], version: str) -> int:
        written = 0
        for user_id, item_ids in histories:
            if not len(item_ids) or user_id in self.erased:
                continue
            stored = list(self.histories.get(user_id, ()))
            training = list(item_ids)[-self.max_length:]
            known = set(training)
            merged = deque(training + [item for item in stored if item not in known], maxlen=self.max_length)
            if list(merged) != stored:
                self.histories[user_id] = merged
                written += 1
        self.seeded.add(version)
        return written

    async def is_seeded(self, version: str) -> bool:
        return version in self.seeded

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
    """Merge the checkpoint's training histories in, unless this model version did already.
    Never raises for an unreachable store: serving goes on, and the server tries again later."""
    try:
        if await store.is_seeded(checkpoint.model_version):
            return
        started = time.perf_counter()
        written = await store.seed(checkpoint_histories(checkpoint), checkpoint.model_version)
        log.info("history store seeded from %s: %d users' histories changed (training items merged before "
                 "stored events) in %.1f s", checkpoint.path, written, time.perf_counter() - started)
    except HistoryStoreUnavailable as e:
        log.warning("history store not seeded yet (will retry): %s", e)


def open_history_store(redis_url: str | None, key_prefix: str, max_length: int, timeout_s: float,
                       ttl_s: int = 0) -> HistoryStore:
    """Redis when a URL is configured, else the in-process store (no TTL: it ends with the process).
    Connecting is lazy: this never fails because Redis is down (readiness and requests report that)."""
    if redis_url:
        return RedisHistoryStore(redis_url, key_prefix, max_length, timeout_s, ttl_s)
    return InProcessHistoryStore(max_length)
