"""A loaded checkpoint as the server runs it: ids -> prompt -> one forward pass over all items -> top-k.

Who gets which prompt (docs/serving.md, "Cold start"):
    known user (has a token)           the trained prompt: user token + history
    unknown user, >= 1 known item      the history-only prompt the trainer also trains on   (cold start)
    unknown user, no known item        most-popular, nothing to prompt with        (cold start, fallback)
History item ids the model does not know are skipped and listed in the response. The prompt holds
the known items with repeats dropped (the most recent occurrence stays), the last max_history of
them (the checkpoint's limit); exclude_seen masks every item of the history, not only those in the
prompt.

The model runs nowhere else than ServedModel.score: one padded forward pass for a batch of
prompts (model.cllm4rec.score_prompts, the function offline evaluation uses), then masking and
top-k, in the batcher's worker thread or, for a lone request, on the event loop's thread (and once, to
warm up a reloaded checkpoint, in the thread that loads it). There is no token-by-token decoding.
Answers are encoded here too, from per-item JSON fragments made once at load.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch

from model.checkpoint import Recommender, load_recommender
from model.cllm4rec import score_prompts
from model.config import ConfigError
from model.initialise import text_vector
from model.placement import CatalogueTexts, TextReadout, head_rows
from model.prompts import build_recommend_prompt
from service import metrics
from service.catalogue import CatalogueState, LiveItem
from service.precision import PrecisionChoice, choose_backbone_format, pin_backbone_format
from service.settings import Settings

log = logging.getLogger(__name__)

# CLLM4REC_DTYPE: None is load_recommender's default (float32 weights; bfloat16 compute on CUDA).
MODEL_DTYPES = {"auto": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_device(setting: str) -> torch.device | None:
    """None: load_recommender's default (CUDA when available)."""
    if setting == "auto":
        return None
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CLLM4REC_DEVICE=cuda: no CUDA device is available")
    return torch.device(setting)


@dataclass(eq=False)  # compared and hashed by identity: jobs are grouped by the model they belong to
class ServedModel:
    """A loaded checkpoint and what serving derives from it; a reload replaces it as a whole."""

    recommender: Recommender
    titles: list[str | None]
    popularity: list[float]  # training interactions per item
    popular_first: list[int]  # item indices, most popular first (ties: lower index first)
    precision: PrecisionChoice  # the backbone's number format, and why
    live: set[str] = field(default_factory=set)  # ids of the items added live (after the checkpoint's)
    # Per item, its answer entry's JSON around the score, encoded once (ids and titles never change):
    # an answer of thousands of items is then a join, not thousands of objects (docs/benchmarks.md,
    # "The profile": building RecommendedItem objects held the GIL about 45 ms per 32,000 items).
    item_json: list[tuple[bytes, bytes]] = field(default_factory=list)
    # Held by a forward pass and by adding live items: the item tables never grow under a pass.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # A readout head's text term for live items, fitted at load: fitting it on the first live item held every
    # request of the replica for a second (docs/benchmarks.md, "Live items without a stall").
    text_readout: TextReadout | None = None
    # The trained catalogue's texts, tokenized at load for a readout head (its text term's fit reads them), else
    # on the first live item.
    catalogue_texts: CatalogueTexts | None = None
    # The catalogue's retired ids as this model's indices, for the set of ids they were made from and the
    # catalogue's size then (retired_items): made once per change, not per request.
    retired_made: tuple[frozenset[str], int, RetiredItems] | None = None
    # The catalogue state (replaced on every change) whose live items this model holds: checked by identity,
    # not item by item, on every request.
    catalogue_synced: CatalogueState | None = None

    @classmethod
    def load(cls, checkpoint: Path, settings: Settings) -> ServedModel:
        """Raises CheckpointError, BackboneError or ConfigError saying what is wrong."""
        recommender = load_recommender(checkpoint, model_device(settings.device), MODEL_DTYPES[settings.dtype])
        if settings.dtype == "auto":
            if recommender.device.type == "cpu":
                torch.set_num_threads(settings.resolved_torch_threads())  # timed as it will serve
            precision = choose_backbone_format(recommender, settings.max_batch_size, settings.onnxruntime_spinning) \
                if settings.backbone_format == "auto" else \
                pin_backbone_format(recommender, settings.backbone_format, settings.max_batch_size,
                                    settings.onnxruntime_spinning)
        else:
            precision = PrecisionChoice(settings.dtype, f"CLLM4REC_DTYPE={settings.dtype}")
        popularity = torch.as_tensor(recommender.popularity, dtype=torch.float32)
        titles = [title or None for title in recommender.checkpoint.item_titles]
        texts = CatalogueTexts(recommender.checkpoint.item_texts) if recommender.model.has_head_readout else None
        return cls(recommender, titles, popularity.tolist(), torch.argsort(popularity, descending=True,
                                                                         stable=True).tolist(), precision,
                   item_json=[item_json(i, t) for i, t in zip(recommender.checkpoint.item_ids, titles)],
                   text_readout=None if texts is None else fit_text_readout(recommender, texts), catalogue_texts=texts)

    @property
    def version(self) -> str:
        return self.recommender.checkpoint.model_version

    def publish_info(self) -> None:
        meta = self.recommender.checkpoint.meta
        metrics.model_info.info({"model_version": self.version, "backbone": meta["backbone"]["name"],
                                 "backbone_layers": str(meta["backbone"]["layers"]), "n_items": str(meta["n_items"]),
                                 "n_users": str(meta["n_users"]), "precision": self.precision.precision})

    def job(self, user: int | None, history: list[int], excluded: list[int], k: int,
            candidates: list[int] | None = None, retired: RetiredItems | None = None) -> ScoreJob:
        recommender = self.recommender
        return ScoreJob(self, build_recommend_prompt(recommender.space, user, history, recommender.max_history),
                        excluded, k, candidates, retired)

    def retired_items(self, item_ids: frozenset[str]) -> RetiredItems:
        """The retired ids (CatalogueState.retired) as this model's items, made again only when the ids or the
        model's items (live items added) changed: thousands of retired items cost a request nothing more."""
        size = len(self.recommender.item_index)
        made = self.retired_made
        if made is None or made[0] is not item_ids or made[1] != size:
            indices = sorted(self.indices(item_ids))
            made = self.retired_made = (item_ids, size, RetiredItems(
                frozenset(indices), torch.as_tensor(indices, dtype=torch.long, device=self.recommender.device)))
        return made[2]

    def indices(self, item_ids: Iterable[str]) -> list[int]:
        """The item indices of the ids this model knows, in order; ids it does not know are skipped."""
        item_index = self.recommender.item_index
        return [item_index[item_id] for item_id in item_ids if item_id in item_index]

    def most_popular(self, excluded: Sequence[int], k: int, candidates: Sequence[int] | None = None,
                     retired: RetiredItems | None = None) -> Ranking:
        """The fallback: the k most popular items neither excluded nor retired (and among the candidates, when
        given), from the order sorted once at load."""
        excluded = set(excluded)
        gone = retired.indices if retired is not None else frozenset()
        allowed = set(candidates) if candidates is not None else None
        items = list(islice((i for i in self.popular_first
                             if i not in excluded and i not in gone and (allowed is None or i in allowed)), k))
        return items, [self.popularity[i] for i in items]

    def response_json(self, answer: Answer) -> bytes:
        """The response body, a RecommendResponse's JSON, joined from the items' fragments encoded at load
        (built without validation: every field comes from this model)."""
        fragments = self.item_json
        items = b",".join(fragments[i][0] + repr(float(s)).encode() + fragments[i][1]
                          for i, s in zip(answer.items, answer.scores))
        return b"".join((b'{"user_id":', to_json(answer.user_id), b',"items":[', items, b'],"model_version":',
                         to_json(self.version), b',"cold_start":', to_json(answer.cold_start), b',"fallback":',
                         to_json(answer.fallback), b',"unknown_item_ids":', to_json(answer.unknown_item_ids), b"}"))

    def warm_up_job(self) -> ScoreJob:
        return self.job(0 if self.recommender.space.n_users else None, [0], [0], 1)

    def add_live_items(self, items: Sequence[LiveItem]) -> None:
        """Grow the catalogue by items placed by their text (model/placement.py): the token as training
        starts items from their titles (model.initialise.text_vector), the head's rows from the text's
        similarity to the checkpoint's items (a readout head's text term is fitted on the first call).
        Runs in a thread; waits for the forward pass in progress."""
        recommender = self.recommender
        model = recommender.model
        words = model.backbone.get_input_embeddings().weight.detach().float()
        vectors = [text_vector(words, recommender.space.tokenizer, item.token_text) for item in items]
        vectors = torch.stack([words.mean(0) if vector is None else vector for vector in vectors])
        if self.catalogue_texts is None:
            self.catalogue_texts = CatalogueTexts(recommender.checkpoint.item_texts)
        rows = head_rows(model, vectors, self.catalogue_texts.similarities([item.text for item in items]),
                         self.text_readout)
        with self.lock:
            model.add_items(vectors, rows)
            recommender.space.n_items += len(items)
            for item in items:
                index = len(recommender.checkpoint.item_ids)
                recommender.item_index[item.item_id] = index
                recommender.checkpoint.item_ids.append(item.item_id)
                self.titles.append(item.title or None)
                self.item_json.append(item_json(item.item_id, item.title or None))
                self.popularity.append(0.0)
                self.popular_first.append(index)
                self.live.add(item.item_id)

    def score(self, jobs: Sequence[ScoreJob]) -> list[Ranking]:
        """One padded forward pass for jobs of this model, masking and top-k."""
        with self.lock:
            scores = score_prompts(self.recommender.model, [job.prompt for job in jobs])  # [B, n_items] float32
        for row, job in enumerate(jobs):
            if job.candidates is not None:  # only the candidates may be ranked
                allowed = torch.as_tensor(job.candidates, dtype=torch.long, device=scores.device)
                kept = scores[row, allowed]
                scores[row] = -torch.inf
                scores[row, allowed] = kept
        rows = [row for row, job in enumerate(jobs) for _ in job.excluded]
        if rows:
            columns = [item for job in jobs for item in job.excluded]
            scores[torch.as_tensor(rows, device=scores.device),
                   torch.as_tensor(columns, device=scores.device)] = -torch.inf
        retired_rows: dict[int, tuple[torch.Tensor, list[int]]] = {}  # the jobs of one catalogue state share it
        for row, job in enumerate(jobs):
            if job.retired is not None and job.retired.indices:
                retired_rows.setdefault(id(job.retired), (job.retired.tensor, []))[1].append(row)
        for retired, rows in retired_rows.values():
            scores[torch.as_tensor(rows, device=scores.device)[:, None], retired] = -torch.inf
        return top_k(scores, [job.k for job in jobs])


def fit_text_readout(recommender: Recommender, catalogue: CatalogueTexts) -> TextReadout:
    """A readout head's text term for live items (model/placement.py), in the backbone format that serves (the
    other heads place live items without one)."""
    started = time.perf_counter()
    checkpoint = recommender.checkpoint
    text_readout = TextReadout.fit(recommender.model, recommender.space, checkpoint.split, recommender.max_history,
                                   catalogue)
    log.info("live items' text term fitted for model %s in %.1f s: scale %.4g", checkpoint.model_version,
             time.perf_counter() - started, text_readout.scale)
    return text_readout


def latest_unique(items: list[int]) -> list[int]:
    """A history as its prompt holds it: repeats dropped, each item at its latest occurrence, oldest first."""
    return list(dict.fromkeys(reversed(items)))[::-1]


@dataclass(frozen=True)
class RetiredItems:
    """The catalogue's retired items as one model's indices, as a set (the fallback) and as a tensor on the
    model's device (a row's mask)."""

    indices: frozenset[int]
    tensor: torch.Tensor


@dataclass
class ScoreJob:
    """One prompt for the batcher: its top k items, the `excluded` item indices (the request's own) and
    the `retired` ones left out (and only `candidates` ranked, when given), scored by the model whose token
    space the prompt and indices belong to."""

    model: ServedModel
    prompt: list[int]
    excluded: list[int]
    k: int
    candidates: list[int] | None = None
    retired: RetiredItems | None = None


# (item indices, scores), best first
Ranking = tuple[list[int], list[float]]

@dataclass
class Answer:
    """One request's ranking and what its response says about it."""

    user_id: str
    items: list[int]
    scores: list[float]
    cold_start: bool
    fallback: str | None
    unknown_item_ids: list[str]


def to_json(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def item_json(item_id: str, title: str | None) -> tuple[bytes, bytes]:
    """An answer entry's JSON before and after its score: {"item_id":...,"score": | ,"title":...}."""
    return b'{"item_id":' + to_json(item_id) + b',"score":', b',"title":' + to_json(title) + b"}"


def load_and_warm_up(checkpoint: Path, settings: Settings) -> ServedModel:
    """A new model that has scored one prompt (so its first request pays no lazy initialisation).
    Runs in a thread of its own, beside the forward passes of the model that is serving."""
    model = ServedModel.load(checkpoint, settings)
    model.score([model.warm_up_job()])
    return model


def top_k(scores: torch.Tensor, ks: Sequence[int]) -> list[Ranking]:
    """Per row, the k best (index, score) pairs, best first; masked (-inf) items never appear."""
    values, indices = torch.topk(scores, min(max(ks), scores.shape[1]), dim=1)
    values, indices = values.cpu(), indices.cpu()
    rankings = []
    for row, k in enumerate(ks):
        keep = torch.isfinite(values[row, :k])
        rankings.append((indices[row, :k][keep].tolist(), values[row, :k][keep].tolist()))
    return rankings
