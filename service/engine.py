"""The requests' side of serving: what the routes call, around the served model (service/served_model.py).

A request's way: its history from the store (one round trip for all users of a call and the
catalogue's version), the business rules (seen, excluded, candidate and retired items) as masks, the job to
the batcher (service/batcher.py), which scores it in one forward pass with whatever else is waiting; the
answer's JSON from the served model. Histories, interactions, erasure and the live catalogue's items
are read and written here too.

Hot reload (Engine.reload): the new checkpoint is loaded and warmed up in a thread while the old
one serves, then swapped in with one assignment. A request takes the model once, when it starts,
and every job carries the model that built its prompt, so in-flight requests finish on the model
they started with; a batch that holds jobs of both models scores each model's jobs in a forward pass
of its own. The old model is freed once its last job is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from model.backbone import BackboneError
from model.checkpoint import CheckpointError
from model.config import ConfigError
from service import metrics
from service.batcher import Batcher
from service.catalogue import Catalogue, CatalogueState, LiveItem
from service.heap import freeze_long_lived
from service.histories import HistoryStore, seed_from_checkpoint
from service.schemas import (ErasureResponse, HistoryResponse, InteractionsResponse, ItemResponse,
                             RecommendQuery, ReloadResponse)
from service.served_model import (Answer, Ranking, RetiredItems, ScoreJob, ServedModel, latest_unique,
                                  load_and_warm_up)
from service.settings import Settings

log = logging.getLogger(__name__)


class RequestTimeout(RuntimeError):
    """The recommendation was not ready within CLLM4REC_REQUEST_TIMEOUT_S."""


class UnknownItem(LookupError):
    """The item id is not in the served catalogue (404)."""


class ItemExists(ValueError):
    """An item of that id is in the catalogue already (409)."""


class ReloadFailed(RuntimeError):
    """The new checkpoint could not be loaded or warmed up; the message says why. The old model
    still serves."""


# Responses of more items than this are built off the event loop: on the 2-core test machine 100,000
# items (a batch of 100 at k = 1000) took 0.7-0.8 s to build, time the loop could not answer probes;
# smaller responses are built in place, without a thread hop.
INLINE_RESPONSE_ITEMS = 1000


class Engine:
    """The served model, the history store and the batcher: what the routes work with."""

    def __init__(self, model: ServedModel, store: HistoryStore, settings: Settings):
        self.model = model
        self.store = store
        self.catalogue = Catalogue(store)
        self.settings = settings
        # torch's CPU thread count is a setting of the thread that runs the forward pass, so it is set there.
        threads = settings.resolved_torch_threads()
        self.batcher: Batcher[ScoreJob, Ranking] = Batcher(
            self.score_batch, settings.max_batch_size, settings.max_wait_ms / 1000, settings.queue_size,
            thread_initializer=lambda: torch.set_num_threads(threads), on_death=self.batcher_died,
            lone_on_loop=settings.lone_pass_on_loop)
        self.warmed_up = False
        self.failure: str | None = None  # why this replica can no longer serve (it is stopping)
        self.on_fatal: Callable[[], None] | None = None  # set by `cllm4rec serve`: stop the process
        self.reloading = asyncio.Lock()  # one reload at a time; others wait for it
        self.syncing = asyncio.Lock()  # one catalogue sync at a time: a live item is added once
        model.publish_info()

    # --- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()

    async def warm_up(self) -> None:
        """Score one real request on each thread that runs passes: the first forward pass pays for lazy
        initialisation (allocations, kernels, the thread's pool), a user's request should not."""
        await self.batcher.warm_up(self.model.warm_up_job())
        self.warmed_up = True

    async def close(self) -> None:
        await self.batcher.stop()
        await self.store.close()

    def batcher_died(self, reason: str) -> None:
        self.failure = reason
        if self.on_fatal is not None:
            self.on_fatal()

    @property
    def ready(self) -> bool:
        return self.warmed_up and self.batcher.alive

    async def seed_histories(self) -> None:
        if self.settings.seed_histories:
            await seed_from_checkpoint(self.store, self.model.recommender.checkpoint)

    async def reload(self, checkpoint: Path) -> ReloadResponse:
        """Load `checkpoint` and warm it up in a thread while the current model serves, then swap it
        in between two batches. Raises ReloadFailed, keeping the current model, if it is outside the
        checkpoint root (CLLM4REC_CHECKPOINT_ROOT) or cannot be loaded or scored. The message names
        no cause a caller could use to probe the server's files; the log has the cause."""
        async with self.reloading:
            started = time.perf_counter()
            previous = self.model.version
            refused = ReloadFailed(f"reload of {checkpoint} failed, still serving {previous}: not a loadable "
                                   "checkpoint under the checkpoint root (the server log says why)")
            root = self.settings.reload_root()
            if root is None or not checkpoint.resolve().is_relative_to(root):
                log.warning("reload of %s refused: not under the checkpoint root %s (CLLM4REC_CHECKPOINT_ROOT)",
                            checkpoint, root)
                metrics.reloads.labels("failed").inc()
                raise refused
            try:
                model = await asyncio.to_thread(load_and_warm_up, checkpoint, self.settings)
            except (CheckpointError, BackboneError, ConfigError) as e:
                log.warning("reload of %s failed: %s", checkpoint, e)
                metrics.reloads.labels("failed").inc()
                raise refused from e
            except Exception as e:  # a checkpoint that loads but cannot be scored is refused too
                log.exception("reload of %s failed", checkpoint)
                metrics.reloads.labels("failed").inc()
                raise refused from e
            self.model = model  # from here on new requests use it; the old one goes with its last job
            model.publish_info()
            metrics.reloads.labels("ok").inc()
            await self.seed_histories()  # users new in this checkpoint get their training histories
            freeze_long_lived()  # the old model, its last jobs done by now, is collected; the new one frozen
            seconds = time.perf_counter() - started
            log.info("reloaded: serving %s (model %s, was %s), loaded in %.1f s", checkpoint, model.version,
                     previous, seconds)
            return ReloadResponse(model_version=model.version, previous_model_version=previous,
                                  checkpoint=str(checkpoint), seconds=seconds)

    # --- scoring (worker thread) -------------------------------------------------------------------
    @staticmethod
    def score_batch(jobs: Sequence[ScoreJob]) -> list[Ranking]:
        """Jobs of one model share a forward pass. Around a reload a batch can hold jobs of the old
        and the new model: each model scores its own, never mixed in one pass."""
        rankings: list[Ranking | None] = [None] * len(jobs)
        by_model: dict[ServedModel, list[int]] = {}
        for i, job in enumerate(jobs):
            by_model.setdefault(job.model, []).append(i)
        for model, indices in by_model.items():
            for i, ranking in zip(indices, model.score([jobs[i] for i in indices])):
                rankings[i] = ranking
        return rankings

    # --- requests ----------------------------------------------------------------------------------
    async def recommend(self, requests: Sequence[RecommendQuery]) -> list[bytes]:
        """Each request's RecommendResponse, as JSON."""
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):  # no task of its own, unlike wait_for
                return await self._recommend(requests)
        except TimeoutError:
            raise RequestTimeout(f"no recommendation within {self.settings.request_timeout_s:g} s "
                                 "(CLLM4REC_REQUEST_TIMEOUT_S)") from None

    async def _recommend(self, requests: Sequence[RecommendQuery]) -> list[bytes]:
        model = self.model  # the whole request is answered by one model, even if a reload swaps it meanwhile
        histories: list[Sequence[str] | None] = [r.history for r in requests]
        stored = [i for i, r in enumerate(requests) if r.history is None]
        # One store round trip for every user whose history is needed and the catalogue's version;
        # meanwhile a forward pass about to start waits for these requests (up to max_wait).
        with self.batcher.arriving(len(requests)):
            if stored:
                fetched, version = await self.store.get_beside([requests[i].user_id for i in stored],
                                                               self.catalogue.version_key)
                catalogue = await self.with_live_items(model, await self.catalogue.catch_up(version))
            else:
                fetched, catalogue = [], await self.sync_catalogue(model)
        for i, history in zip(stored, fetched):
            histories[i] = history
        retired = model.retired_items(catalogue.retired)
        answers: list[Answer | None] = [None] * len(requests)
        # At most one batch's worth of jobs in the queue per call: a large /recommend/batch fills
        # full forward passes one after another instead of taking the whole queue.
        step = self.settings.max_batch_size
        for start in range(0, len(requests), step):
            chunk = range(start, min(start + step, len(requests)))
            calls = [self.recommend_one(model, requests[i], histories[i], retired, siblings=len(chunk) > 1)
                     for i in chunk]
            # gather makes a task of each call, all settling before a failure is raised; a lone request
            # (every POST /recommend) awaits its call as it is: 0.07 ms a request (bench/overhead_ab.py).
            results = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls, return_exceptions=True)
            for error in results:
                if isinstance(error, BaseException):
                    raise error
            for i, answer in zip(chunk, results):
                answers[i] = answer
        if sum(len(answer.items) for answer in answers) <= INLINE_RESPONSE_ITEMS:
            return [model.response_json(answer) for answer in answers]
        # Thousands of items take the event loop for tens of milliseconds or more: build them in a
        # thread, so probes and other requests are answered meanwhile.
        return await asyncio.to_thread(lambda: [model.response_json(answer) for answer in answers])

    async def recommend_one(self, model: ServedModel, request: RecommendQuery, history: Sequence[str],
                            retired: RetiredItems | None = None, siblings: bool = False) -> Answer:
        recommender = model.recommender
        item_index = recommender.item_index
        known = model.indices(history)
        # Only ids the caller sent come back: a stored history is not theirs to read through this answer.
        sent = [*(request.history or ()), *(request.exclude_item_ids or ()), *(request.candidate_item_ids or ())]
        unknown = list(dict.fromkeys(item_id for item_id in sent if item_id not in item_index))
        # Business rules and the history, as masks on the one pass's scores.
        excluded = set(known) if request.exclude_seen else set()
        excluded.update(model.indices(request.exclude_item_ids or ()))
        excluded = sorted(excluded)
        candidates = None if request.candidate_item_ids is None else \
            sorted(set(model.indices(request.candidate_item_ids)))
        user = recommender.user_index.get(request.user_id)
        fallback = None
        if user is None:
            metrics.cold_start.inc()
        if user is None and not known:
            metrics.fallback.inc()
            fallback = "most_popular"
            items, values = model.most_popular(excluded, request.k, candidates, retired)
        else:
            items, values = await self.batcher.submit(model.job(user, latest_unique(known), excluded, request.k,
                                                                candidates, retired), siblings)
        return Answer(request.user_id, items, values, user is None, fallback, unknown)

    async def sync_catalogue(self, model: ServedModel) -> CatalogueState:
        """The catalogue as last changed by any replica, with its new live items added to `model`."""
        return await self.with_live_items(model, await self.catalogue.refresh())

    async def with_live_items(self, model: ServedModel, state: CatalogueState) -> CatalogueState:
        """`state`, its live items that `model` lacks added to it first."""
        synced = model.catalogue_synced
        if (synced is not None and synced.live is state.live) or all(item_id in model.live for item_id in state.live):
            model.catalogue_synced = state
            return state
        async with self.syncing:
            new = [item for item_id, item in state.live.items()
                   if item_id not in model.live and item_id not in model.recommender.item_index]
            if new:
                await asyncio.to_thread(model.add_live_items, new)
                log.info("live items added to model %s: %d", model.version, len(new))
        model.catalogue_synced = state
        return state

    async def item(self, item_id: str) -> ItemResponse:
        """Raises UnknownItem for an id the served model does not have."""
        model = self.model
        state = await self.sync_catalogue(model)
        index = model.recommender.item_index.get(item_id)
        if index is None:
            raise UnknownItem(f"no item {item_id!r} in the catalogue of model {model.version}")
        return ItemResponse(item_id=item_id, title=model.titles[index],
                            source="live" if item_id in model.live else "checkpoint",
                            available=item_id not in state.retired)

    async def add_item(self, item: LiveItem) -> ItemResponse:
        """Raises ItemExists for an id that is in the catalogue already (checkpoint or live)."""
        exists = ItemExists(f"item {item.item_id!r} is in the catalogue already")
        if item.item_id in self.model.recommender.item_index:
            raise exists
        if not await self.catalogue.add(item):
            raise exists
        return await self.item(item.item_id)

    async def similar_items(self, item_id: str, k: int) -> bytes:
        """The items most likely after this one: one forward pass of the trainer's history-only prompt
        with this item alone (`a user has interacted with <item>, the user will interact with`), the
        same head as /recommend; the item itself and retired items left out."""
        model = self.model
        state = await self.sync_catalogue(model)
        index = model.recommender.item_index.get(item_id)
        if index is None:
            raise UnknownItem(f"no item {item_id!r} in the catalogue of model {model.version}")
        items, scores = await self.batcher.submit(model.job(None, [index], [index], k,
                                                            retired=model.retired_items(state.retired)))
        return model.response_json(Answer(item_id, items, scores, cold_start=True, fallback=None,
                                          unknown_item_ids=[]))

    async def set_item_available(self, item_id: str, available: bool) -> ItemResponse:
        await self.item(item_id)  # refuses unknown ids before anything is stored
        await self.catalogue.set_available(item_id, available)
        return await self.item(item_id)

    async def history(self, user_id: str) -> HistoryResponse:
        return HistoryResponse(user_id=user_id, item_ids=(await self.store.get([user_id]))[0])

    async def erase_history(self, user_id: str) -> ErasureResponse:
        return ErasureResponse(user_id=user_id, erased=await self.store.erase(user_id))

    async def add_interactions(self, user_id: str, item_ids: Sequence[str]) -> InteractionsResponse:
        """Answers only once the store has acknowledged the write (Redis: the MULTI's EXEC reply);
        any failure or timeout raises HistoryStoreUnavailable (503), so an answered 200 is stored."""
        length = await self.store.append(user_id, item_ids)
        item_index = self.model.recommender.item_index
        unknown = list(dict.fromkeys(item_id for item_id in item_ids if item_id not in item_index))
        return InteractionsResponse(user_id=user_id, history_length=length, unknown_item_ids=unknown)
