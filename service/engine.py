"""The recommendation logic: ids -> prompt -> one forward pass over all items -> top-k.

Who gets which prompt (docs/serving.md, "Cold start"):
    known user (has a token)           the trained prompt: user token + history
    unknown user, >= 1 known item      the history-only prompt the trainer also trains on   (cold start)
    unknown user, no known item        most-popular, nothing to prompt with        (cold start, fallback)
History item ids the model does not know are skipped and listed in the response. The prompt holds
the known items with repeats dropped (the most recent occurrence stays), the last max_history of
them (the checkpoint's limit); exclude_seen masks every item of the history, not only those in the
prompt.

The model runs nowhere else than Engine.score_batch: one padded forward pass for a batch of
prompts (model.cllm4rec.score_prompts, the function offline evaluation uses), then masking and
top-k, in the batcher's worker thread. There is no token-by-token decoding.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.checkpoint import Recommender
from model.cllm4rec import score_prompts
from model.prompts import build_recommend_prompt
from service import metrics
from service.batcher import Batcher
from service.histories import HistoryStore
from service.schemas import InteractionsResponse, RecommendedItem, RecommendRequest, RecommendResponse
from service.settings import Settings

log = logging.getLogger(__name__)


class RequestTimeout(RuntimeError):
    """The recommendation was not ready within CLLM4REC_REQUEST_TIMEOUT_S."""


@dataclass
class ScoreJob:
    """One prompt for the batcher: its top k items, the `seen` item indices excluded."""

    prompt: list[int]
    seen: list[int]
    k: int


# (item indices, scores), best first
Ranking = tuple[list[int], list[float]]


class Engine:
    """The served model, the history store and the batcher: what the routes work with."""

    def __init__(self, recommender: Recommender, store: HistoryStore, settings: Settings):
        self.recommender = recommender
        self.store = store
        self.settings = settings
        self.model_version = recommender.checkpoint.model_version
        self.titles = [title or None for title in recommender.checkpoint.item_titles]
        self.popularity = torch.as_tensor(recommender.popularity, dtype=torch.float32)
        # torch's CPU thread count is a setting of the thread that runs the forward pass, so it is set there.
        threads = settings.resolved_torch_threads()
        self.batcher: Batcher[ScoreJob, Ranking] = Batcher(
            self.score_batch, settings.max_batch_size, settings.max_wait_ms / 1000, settings.queue_size,
            thread_initializer=lambda: torch.set_num_threads(threads))
        self.warmed_up = False

    # --- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()

    async def warm_up(self) -> None:
        """Score one real request through the batcher: the first forward pass pays for lazy
        initialisation (allocations, kernels), a user's request should not."""
        user = 0 if self.recommender.space.n_users else None
        await self.batcher.submit(self.job(user, [0], [0], 1))
        self.warmed_up = True

    async def close(self) -> None:
        await self.batcher.stop()
        await self.store.close()

    # --- scoring (worker thread) -------------------------------------------------------------------
    def score_batch(self, jobs: Sequence[ScoreJob]) -> list[Ranking]:
        scores = score_prompts(self.recommender.model, [job.prompt for job in jobs])  # [B, n_items] float32
        rows = [row for row, job in enumerate(jobs) for _ in job.seen]
        if rows:
            columns = [item for job in jobs for item in job.seen]
            scores[torch.as_tensor(rows, device=scores.device),
                   torch.as_tensor(columns, device=scores.device)] = -torch.inf
        return top_k(scores, [job.k for job in jobs])

    def job(self, user: int | None, history: list[int], seen: list[int], k: int) -> ScoreJob:
        prompt = build_recommend_prompt(self.recommender.space, user, history, self.recommender.max_history)
        return ScoreJob(prompt, seen, k)

    # --- requests ----------------------------------------------------------------------------------
    async def recommend(self, requests: Sequence[RecommendRequest]) -> list[RecommendResponse]:
        try:
            return await asyncio.wait_for(self._recommend(requests), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no recommendation within {self.settings.request_timeout_s:g} s "
                                 "(CLLM4REC_REQUEST_TIMEOUT_S)") from None

    async def _recommend(self, requests: Sequence[RecommendRequest]) -> list[RecommendResponse]:
        histories: list[Sequence[str] | None] = [r.history for r in requests]
        stored = [i for i, r in enumerate(requests) if r.history is None]
        if stored:  # one store round trip for every user whose history is needed
            for i, history in zip(stored, await self.store.get([requests[i].user_id for i in stored])):
                histories[i] = history
        responses: list[RecommendResponse | None] = [None] * len(requests)
        # At most one batch's worth of jobs in the queue per call: a large /recommend/batch fills
        # full forward passes one after another instead of taking the whole queue.
        step = self.settings.max_batch_size
        for start in range(0, len(requests), step):
            chunk = range(start, min(start + step, len(requests)))
            results = await asyncio.gather(*(self.recommend_one(requests[i], histories[i]) for i in chunk),
                                           return_exceptions=True)  # all settle before a failure is raised
            for error in results:
                if isinstance(error, BaseException):
                    raise error
            for i, response in zip(chunk, results):
                responses[i] = response
        return responses

    async def recommend_one(self, request: RecommendRequest, history: Sequence[str]) -> RecommendResponse:
        item_index = self.recommender.item_index
        known = [item_index[item_id] for item_id in history if item_id in item_index]
        unknown = list(dict.fromkeys(item_id for item_id in history if item_id not in item_index))
        seen = sorted(set(known)) if request.exclude_seen else []
        user = self.recommender.user_index.get(request.user_id)
        fallback = None
        if user is None:
            metrics.cold_start.inc()
        if user is None and not known:
            metrics.fallback.inc()
            fallback = "most_popular"
            scores = self.popularity.clone()
            scores[seen] = -torch.inf
            items, values = top_k(scores[None], [request.k])[0]
        else:
            recent_unique = list(dict.fromkeys(reversed(known)))[::-1]  # repeats dropped, latest occurrence kept
            items, values = await self.batcher.submit(self.job(user, recent_unique, seen, request.k))
        item_ids = self.recommender.checkpoint.item_ids
        return RecommendResponse(
            user_id=request.user_id,
            items=[RecommendedItem(item_id=item_ids[i], score=s, title=self.titles[i]) for i, s in zip(items, values)],
            model_version=self.model_version,
            cold_start=user is None,
            fallback=fallback,
            unknown_item_ids=unknown,
        )

    async def add_interactions(self, user_id: str, item_ids: Sequence[str]) -> InteractionsResponse:
        length = await self.store.append(user_id, item_ids)
        item_index = self.recommender.item_index
        unknown = list(dict.fromkeys(item_id for item_id in item_ids if item_id not in item_index))
        return InteractionsResponse(user_id=user_id, history_length=length, unknown_item_ids=unknown)


def top_k(scores: torch.Tensor, ks: Sequence[int]) -> list[Ranking]:
    """Per row, the k best (index, score) pairs, best first; masked (-inf) items never appear."""
    values, indices = torch.topk(scores, min(max(ks), scores.shape[1]), dim=1)
    values, indices = values.cpu(), indices.cpu()
    rankings = []
    for row, k in enumerate(ks):
        keep = torch.isfinite(values[row, :k])
        rankings.append((indices[row, :k][keep].tolist(), values[row, :k][keep].tolist()))
    return rankings
