"""The CLLM4Rec module: a frozen causal LM with two sets of learned user/item token embeddings.

    collaborative view: collab_users, collab_items   (collaborative LM, recommendation head)
    content view:       content_users, content_items (content LM over review/item text)

Ids below n_words are the backbone's own (frozen) word embeddings; the rest index the tables of
the chosen view (layout in model.prompts). The item head is tied to the collaborative item
embeddings: an item's logit is the last hidden state dotted with that item's embedding, so the
model can only ever name items that exist. Head parameters that the paper does not have
(docs/training.md, ablations) sit on top of the tie:

    logit_j = logit_scale * ((head_projection @ hidden) . (collab_items[j] + head_offsets[j])) + item_bias[j]
              + readout_states . head_readout[j]

logit_scale lets the sharpness of the softmax be learned instead of being carried by the norms of
576-wide embeddings; item_bias carries popularity, which a dot product can only express by bending
every item vector towards one direction; head_projection (a square matrix, identity at the start)
is a small adapter that lets the frozen backbone's last hidden state be turned towards the item
embeddings' space. head_offsets (optional, one row per item, zero at the start) unties the head in
part: an item's output vector may move away from its input token, because the frozen backbone's last
hidden state reads the catalogue best through vectors that are not the ones it reads best as inputs
(model/head_readout.py refits them in closed form). head_readout (optional, set by that refit alone, zero
until then) reads more of the same forward pass than the last block's state at the prompt's end:
readout_states are the states at the prompt's end after every inner block and the mean over the prompt's
item positions of every layer's states, the soft tokens themselves (layer 0) included, one hidden-wide
block each. With identity, scale 1, bias 0, no offsets and no readout the head is
the paper's.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.adapters import LowRankAdapter, attach_adapters
from model.prompts import Document

COLLAB, CONTENT = "collab", "content"
EVERY_BATCH_SIZE = range(1, sys.maxsize)
# Rows an item table keeps spare once items are added after training (CLLM4Rec.add_items): the next ones then
# take rows in place, where copying the tables took 68 ms an item at amazon-beauty's 12,101 items (the readout's
# 223 MB, and as much memory again while it copied; docs/benchmarks.md, "Live items without a stall").
SPARE_ITEM_ROWS = 1024


def appended(table: torch.Tensor, rows: torch.Tensor, spare: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """`table` with `rows` after it: a view of spare[name], a buffer with room for more, written in place when
    the table is still that buffer's start and the rows fit, else copied into a new buffer with
    SPARE_ITEM_ROWS rows to spare."""
    n, k = len(table), len(rows)
    buffer = spare.get(name)
    if buffer is None or buffer.data_ptr() != table.data_ptr() or buffer.dtype != table.dtype \
            or buffer.device != table.device or len(buffer) < n + k:
        buffer = spare[name] = table.new_empty((n + k + SPARE_ITEM_ROWS, *table.shape[1:]))
        buffer[:n] = table
    buffer[n : n + k] = rows.to(buffer)
    return buffer[: n + k]


@dataclass
class LMBatch:
    """Documents of one stage, padded on the right. labels[b, t] is the target of position t."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 where no loss (prompt, padding)
    users: torch.Tensor  # user indices of the soft tokens in the batch (mutual regularization)
    items: torch.Tensor  # item indices of the soft tokens in the batch

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_targets(self) -> int:
        return int((self.labels != -100).sum())


@dataclass
class HeadRows:
    """The head's own rows for items added after training (CLLM4Rec.add_items): output offsets [N, H] and
    readout rows [N, readout width], read by a head that has them, and biases [N]."""

    offsets: torch.Tensor
    readout: torch.Tensor
    bias: torch.Tensor


@dataclass
class RecommendBatch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    targets: torch.Tensor  # [B, J] multi-hot of the items to predict
    users: torch.Tensor
    items: torch.Tensor  # the prompt's history items and the targets (mutual regularization)
    histories: list[list[int]]  # each prompt's history items (the teacher's input)
    teacher: torch.Tensor | None = None  # [B, J] weighted teacher distribution (distillation), or None

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_targets(self) -> int:
        return int(self.targets.sum())


def pad(sequences: Sequence[Sequence[int]], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], attention mask [B, T]), padded on the right."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


def collate_documents(documents: Sequence[Document], label_offset: int) -> LMBatch:
    """Prompt + main text; the loss covers the main text. label_offset maps a main token to its class
    (0 for words, n_words + n_users for items, whose classes are item indices)."""
    ids, mask = pad([d.prompt + d.main for d in documents])
    labels = torch.full_like(ids, -100)
    for b, d in enumerate(documents):
        start = len(d.prompt) - 1  # position whose next token is the first main token
        labels[b, start : start + len(d.main)] = torch.as_tensor(d.main, dtype=torch.long) - label_offset
    users = torch.as_tensor([u for d in documents for u in d.users], dtype=torch.long)
    items = torch.as_tensor([i for d in documents for i in d.items], dtype=torch.long)
    return LMBatch(ids, mask, labels, users, items)


def collate_recommend(prompts: Sequence[list[int]], targets: Sequence[Sequence[int]], users: Sequence[int],
                      histories: Sequence[Sequence[int]], n_items: int) -> RecommendBatch:
    ids, mask = pad(prompts)
    multi_hot = torch.zeros((len(prompts), n_items))
    for b, t in enumerate(targets):
        multi_hot[b, list(t)] = 1.0
    # Regularized: every item whose embedding the pass trains, in the prompt or as a target, once per
    # document (as the other stages count them), so a batch's term is the sum of its documents' terms.
    items = [i for h, t in zip(histories, targets) for i in sorted(set(h) | set(t))]
    return RecommendBatch(
        ids, mask, multi_hot,
        torch.as_tensor([u for u in users if u is not None], dtype=torch.long),
        torch.as_tensor(items, dtype=torch.long),
        [list(h) for h in histories],
    )


class CLLM4Rec(nn.Module):
    def __init__(self, backbone: nn.Module, n_users: int, n_items: int, init_std: float | None = 0.02,
                 content_view: bool = True, head_offsets: bool = False, head_readout: bool = False):
        """content_view=False: a model for scoring alone (serving, evaluation), whose content tables are
        empty; scores only ever read the collaborative view, and the content tables are half of the
        per-user memory. init_std=None leaves the tables unwritten (never resident in memory) for a
        checkpoint's tensors to replace (model.checkpoint.load_model_tensors). head_offsets: the head
        has per-item output offsets (else the table is empty and the head fully tied). head_readout: the head
        also reads the readout states (prompt_states; else that table is empty)."""
        super().__init__()
        if head_readout and not head_offsets:
            raise ValueError("a head with a readout needs offsets: the refit writes both")
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        word_embeddings = backbone.get_input_embeddings()
        self.n_words = word_embeddings.num_embeddings
        self.n_users = n_users
        self.n_items = n_items
        hidden = self.hidden_size = word_embeddings.embedding_dim
        # Sparse gradients where a table is only looked up: a step then updates the rows in the
        # batch, not the whole catalogue. collab_items is also the item head, where every item
        # gets a gradient, so it stays dense.
        def table(rows: int, sparse: bool) -> nn.Embedding:  # _weight: skip nn.Embedding's own initialisation
            return nn.Embedding(rows, hidden, sparse=sparse, _weight=torch.empty(rows, hidden))

        self.collab_users = table(n_users, sparse=True)
        self.collab_items = table(n_items, sparse=False)
        self.content_view = content_view
        self.content_users = table(n_users if content_view else 0, sparse=True)
        self.content_items = table(n_items if content_view else 0, sparse=True)
        if init_std is not None:
            for embedding in self.tables(COLLAB) + self.tables(CONTENT):
                nn.init.normal_(embedding.weight, std=init_std)
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        self.logit_scale = nn.Parameter(torch.ones(()))
        self.head_projection = nn.Parameter(torch.eye(hidden))
        self.head_offsets = nn.Parameter(torch.zeros(n_items if head_offsets else 0, hidden))
        # Not trained by gradient: only the closed-form refit writes it (a gradient would cost the memory of
        # a catalogue-wide table per layer), so it stays zero, and out of the logits, until then.
        readout_width = 2 * backbone.config.num_hidden_layers * hidden if head_readout else 0
        self.head_readout = nn.Parameter(torch.zeros(n_items, readout_width), requires_grad=False)  # 0 wide: off
        self.input_gradients = True  # train the soft tokens through the backbone too (the paper); see embed()
        # Another engine running the same frozen backbone for passes without gradients (model/onnx_backbone.py:
        # serving's where it measures faster, training's and evaluation's on a CPU), or None: PyTorch's. It runs
        # batches of the sizes in inference_batch_sizes, every size unless serving measured PyTorch's format
        # faster for the small or the large ones (service/precision.py).
        self.inference_backbone = None
        self.inference_batch_sizes = EVERY_BATCH_SIZE
        self.adapters: dict[str, LowRankAdapter] = {}  # low-rank adapters in the backbone (model.adapters), if any
        self.adapter_rank = self.adapter_layers = 0
        self.adapter_targets = "all"

    def attach_adapters(self, rank: int, n_layers: int, targets: str = "all") -> None:
        """Low-rank adapters on the linear maps of the backbone's last n_layers blocks (model.adapters)."""
        self.adapters = attach_adapters(self.backbone, rank, n_layers, targets)
        self.adapter_rank, self.adapter_layers, self.adapter_targets = rank, n_layers, targets

    @torch.no_grad()
    def add_items(self, vectors: torch.Tensor, rows: HeadRows) -> None:
        """Grow the item vocabulary by len(vectors) items: both views start at `vectors`, the head takes
        `rows` (a tied head its biases alone; model/placement.py chooses them). They are scored from the next
        forward pass on, without retraining."""
        spare = self.__dict__.setdefault("_spare_item_rows", {})  # table name -> the buffer it is a view of
        if self.has_head_offsets:
            self.head_offsets = nn.Parameter(appended(self.head_offsets, rows.offsets, spare, "head_offsets"))
            self.head_readout = nn.Parameter(appended(self.head_readout, rows.readout, spare, "head_readout"),
                                             requires_grad=False)
        for name in (COLLAB, CONTENT) if self.content_view else (COLLAB,):
            table = self.tables(name)[1]
            table.weight = nn.Parameter(appended(table.weight, vectors, spare, f"{name}_items"))
            table.num_embeddings = table.weight.shape[0]
        self.item_bias = nn.Parameter(appended(self.item_bias, rows.bias, spare, "item_bias"))
        self.n_items += len(vectors)

    def token_mean_columns(self) -> slice:
        """The readout's columns that read the mean of the prompt's item tokens (layer 0 of the item means;
        the layout in prompt_states)."""
        start = (self.backbone.config.num_hidden_layers - 1) * self.hidden_size
        return slice(start, start + self.hidden_size)

    @property
    def has_head_offsets(self) -> bool:
        return len(self.head_offsets) > 0

    @property
    def has_head_readout(self) -> bool:
        return self.head_readout.shape[1] > 0

    def tables(self, view: str) -> tuple[nn.Embedding, nn.Embedding]:
        return (self.collab_users, self.collab_items) if view == COLLAB else (self.content_users, self.content_items)

    def train(self, mode: bool = True):
        # The backbone stays in eval mode (no dropout): it is a fixed feature extractor.
        super().train(mode)
        self.backbone.eval()
        return self

    # --- forward -----------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, view: str) -> torch.Tensor:
        users, items = self.tables(view)
        word_embeddings = self.backbone.get_input_embeddings()
        embeds = word_embeddings(input_ids.clamp(max=self.n_words - 1))
        is_user = (input_ids >= self.n_words) & (input_ids < self.n_words + self.n_users)
        is_item = input_ids >= self.n_words + self.n_users
        soft_users = users(input_ids[is_user] - self.n_words).to(embeds.dtype)
        soft_items = items(input_ids[is_item] - self.n_words - self.n_users).to(embeds.dtype)
        if not self.input_gradients:
            # The soft tokens still enter the backbone, but nothing flows back through it: a step costs
            # one forward pass, and the tables learn from the tied head (and the regularization) alone.
            soft_users, soft_items = soft_users.detach(), soft_items.detach()
        embeds[is_user] = soft_users
        embeds[is_item] = soft_items
        return embeds

    def backbone_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, view: str,
                        every_layer: bool = False):
        """The backbone's output on the view's embeddings (with every layer's states when every_layer); without
        gradients through the inference backbone when one is set and gives them."""
        embeds = self.embed(input_ids, view)
        runner = self.inference_runner(len(embeds))
        if runner is not None and not torch.is_grad_enabled() and (runner.every_layer or not every_layer):
            return runner(embeds, attention_mask)
        return self.backbone.base_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False,
                                        output_hidden_states=every_layer)

    def inference_runner(self, batch_size: int):
        """The inference backbone where it runs batches of this size, else None (PyTorch's backbone)."""
        return self.inference_backbone if batch_size in self.inference_batch_sizes else None

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, view: str) -> torch.Tensor:
        return self.backbone_output(input_ids, attention_mask, view).last_hidden_state

    def prompt_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the item head reads of recommendation prompts (collaborative view): the last hidden state at
        each prompt's end [B, hidden] and, with a readout, the readout states [B, readout width]: the state at
        the prompt's end after each inner block (the embeddings' there is a fixed word's), then the mean over
        the prompt's item positions of the embeddings and of each block's output (zeros without items)."""
        out = self.backbone_output(input_ids, attention_mask, COLLAB, every_layer=self.has_head_readout)
        rows, ends = torch.arange(len(input_ids), device=input_ids.device), attention_mask.sum(1) - 1
        last = out.last_hidden_state[rows, ends]
        if not self.has_head_readout:
            return last, None
        layers = (*out.hidden_states[:-1], out.last_hidden_state)  # the embeddings, then every block's output
        at_end = [states[rows, ends] for states in layers[1:-1]]
        is_item = (input_ids >= self.n_words + self.n_users) & attention_mask.bool()
        weights = is_item.to(last.dtype) / is_item.sum(1, keepdim=True).clamp(min=1).to(last.dtype)
        item_means = [torch.einsum("bt,bth->bh", weights, states) for states in layers]
        return last, torch.cat(at_end + item_means, 1)

    def head_parameters(self, bias: bool = True, projection: bool = False) -> list[nn.Parameter]:
        """The dense parameters the collaborative view trains besides its tables: the head's, the adapters'."""
        adapters = [p for adapter in self.adapters.values() for p in (adapter.down, adapter.up)]
        offsets = [self.head_offsets] if self.has_head_offsets else []
        return ([self.item_bias, self.logit_scale] if bias else []) + ([self.head_projection] if projection else []) \
            + offsets + adapters

    def output_vectors(self) -> torch.Tensor:
        """[J, H] float32: what the head dots with, the item embeddings plus their offsets. Outside autograd
        (scoring, validation) the sum is kept until either table changes (in place, replaced, moved or
        converted): a request would otherwise redo a catalogue-sized sum, 3-4 ms of a 30-40 ms batch-1 pass
        at amazon-beauty's 12,101 items (docs/benchmarks.md, "The head's output vectors kept")."""
        items, offsets = self.collab_items.weight, self.head_offsets

        def summed() -> torch.Tensor:
            return items.float() + offsets.float() if self.has_head_offsets else items.float()

        if torch.is_grad_enabled() and (items.requires_grad or offsets.requires_grad):
            return summed()
        tables = (items, offsets)  # held by the cache, so their storage is not reused while it lives
        state = tuple((table.data_ptr(), table._version, table.dtype, table.device) for table in tables)
        cache = self.__dict__.get("_output_vectors")
        if cache is None or any(a is not b for a, b in zip(cache[0], tables)) or cache[1] != state:
            self.__dict__["_output_vectors"] = cache = (tables, state, summed())  # no graph: nothing needs one
        return cache[2]

    def item_logits(self, hidden: torch.Tensor, readout_states: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item: the item head is tied to the collaborative item embeddings. readout_states:
        what the readout reads (prompt_states), None where there is none (next-item positions in pretraining).

        Always float32, also inside CUDA's bf16 autocast: bf16 logits tie items in the top k, and
        validation, the best-epoch choice and served rankings all read these scores."""
        with torch.autocast(hidden.device.type, enabled=False):
            logits = (hidden.float() @ self.head_projection.float().T) @ self.output_vectors().T
            logits = self.logit_scale.float() * logits + self.item_bias.float()
            if readout_states is not None:
                logits = logits + readout_states.float() @ self.head_readout.float().T
            return logits

    # --- losses --------------------------------------------------------------------------------
    def mutual_regularization(self, view: str, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Sum over the batch's soft tokens of ||own - other||^2, the other view held fixed; a token listed
        n times (in n documents) counts n times.

        The caller divides by the batch size along with the likelihood term."""
        total = self.collab_items.weight.new_zeros(())
        for own, other, index in zip(self.tables(view), self.tables(CONTENT if view == COLLAB else COLLAB),
                                     (users, items)):
            if len(index):
                # Each row looked up once, weighted by its count: repeated indices would make the
                # gradient's accumulation order, and so its last bits, vary from run to run.
                rows, counts = torch.unique(index, return_counts=True)
                distance = (own(rows) - other(rows).detach()).pow(2).sum(-1)
                total = total + (distance * counts.to(distance.dtype)).sum()
        return total

    def collaborative_nll(self, batch: LMBatch) -> torch.Tensor:
        """Summed next-item negative log-likelihood over the main text (softmax over items only)."""
        hidden = self.hidden_states(batch.input_ids, batch.attention_mask, COLLAB)
        at = batch.labels != -100
        return F.cross_entropy(self.item_logits(hidden[at]), batch.labels[at], reduction="sum")

    def content_nll(self, batch: LMBatch) -> torch.Tensor:
        """Summed next-word negative log-likelihood over the main text (the frozen LM head)."""
        hidden = self.hidden_states(batch.input_ids, batch.attention_mask, CONTENT)
        at = batch.labels != -100
        logits = self.backbone.get_output_embeddings()(hidden[at]).float()
        return F.cross_entropy(logits, batch.labels[at], reduction="sum")

    def recommend_nll(self, batch: RecommendBatch) -> torch.Tensor:
        """Multinomial negative log-likelihood of the target items, summed over the batch, plus the
        cross-entropy towards the teacher's (weighted) distribution when the batch carries one."""
        logits = self.prompt_item_logits(batch.input_ids, batch.attention_mask)
        log_probs = F.log_softmax(logits, dim=-1)
        targets = batch.targets if batch.teacher is None else batch.targets + batch.teacher
        return -(log_probs * targets).sum()

    def prompt_item_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.item_logits(*self.prompt_states(input_ids, attention_mask))


def inference_autocast(model: CLLM4Rec, cache_enabled: bool = True):
    """float32 weights on CUDA compute in bfloat16: the computation training and its validation run, so
    served scores are the ones validation measured (on an H200 it scored about 45k tokens/s at batch
    64, docs/benchmarks.md). On the CPU it is off. cache_enabled=False: every pass casts the weights
    anew (a CUDA graph's capture, model/cuda_graphs.py)."""
    weight = model.collab_items.weight
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache_enabled,
                          enabled=weight.device.type == "cuda" and weight.dtype == torch.float32)


@torch.no_grad()
def score_prompts(model: CLLM4Rec, prompts: Sequence[list[int]]) -> torch.Tensor:
    """Scores of every item for each prompt, one forward pass for the whole batch: [B, J] float32."""
    ids, mask = pad(prompts)
    device = model.collab_items.weight.device
    with inference_autocast(model):
        return model.prompt_item_logits(ids.to(device), mask.to(device)).float()
