"""Training: alternating pretraining with mutual regularization, then recommendation finetuning.

    content epochs   content LM only (reviews and item text)                 paper: 10
    pretrain epochs  one collaborative LM pass, then one content LM pass,     paper: 100
                     each regularised towards the other view (lambda_V)
    finetune epochs  recommendation pass (masked history -> held-out items),  paper: 150
                     then a content LM pass, mutual regularization throughout

Every epoch ends with validation (Recall@20, Recall@40, NDCG@100 on the validation part); the
checkpoint directory always holds the best epoch so far, and train_state/ the latest one, which
`--resume` continues from. Finetuning stops early after `patience` epochs without improvement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from model import checkpoint as ckpt
from model.backbone import DEFAULT_BACKBONE, load_backbone
from model.cllm4rec import COLLAB, CONTENT, CLLM4Rec, collate_documents, collate_recommend
from model.data import Dataset, Split, load_dataset, split_dataset
from model.evaluate import evaluate_cllm4rec, evaluation_users, sample_users, selection_score
from model.prompts import (Document, PromptTemplates, TokenSpace, build_collaborative_document,
                           build_content_documents, build_recommend_prompt)

log = logging.getLogger(__name__)
STATE_DIR = "train_state"
# Up to this batch size a full-depth SmolLM2 step took the same time on an H200 (docs/benchmarks.md).
GPU_FLAT_BATCH = 128
# Which view's user/item tables each pass trains (and whose optimizers step).
PASS_VIEW = {"collaborative": COLLAB, "content": CONTENT, "recommend": COLLAB}


@dataclass
class TrainConfig:
    data: str
    out: str
    backbone: str = DEFAULT_BACKBONE
    backbone_layers: int | None = None  # keep the first N transformer layers (None: all)
    seed: int = 0  # the split and everything random in training
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    content_epochs: int = 10
    pretrain_epochs: int = 100
    finetune_epochs: int = 150
    pretrain_lr: float = 1e-3
    finetune_lr: float = 1e-4
    batch_size: int = 20
    lambda_v: float = 1.0
    mask_ratio: float = 0.2
    max_history: int = 50  # items in a recommendation prompt / collaborative document
    max_text_tokens: int = 128  # words of a review or item text in a content document
    finetune_targets: str = "all"  # "all": every training item (reference code); "masked": the held-out items (paper text)
    content: bool = True  # train the content LM at all (text still initialises tokens with text_init)
    finetune_content: bool = True  # keep training the content LM during finetuning (paper)
    anonymous_prompt_ratio: float = 0.1  # finetuning examples without the user token (cold-start prompt)
    init_std: float = 0.02  # N(0, init_std) for tokens without text (paper: all tokens)
    text_init: bool = True  # items start as the mean word embedding of their title, users as their items' mean
    patience: int = 10
    val_users: int = 2000  # validation users sampled once per run (0: all)
    eval_batch_size: int = 64
    device: str = "auto"
    resume: bool = False

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (0 < self.mask_ratio < 1, "--mask-ratio must be in (0, 1)"),
            (self.lambda_v >= 0, "--lambda-v must not be negative"),
            (self.max_history >= 1, "--max-history must be at least 1"),
            (self.max_text_tokens >= 1, "--max-text-tokens must be at least 1"),
            (min(self.content_epochs, self.pretrain_epochs, self.finetune_epochs) >= 0, "epochs must not be negative"),
            (self.content_epochs + self.pretrain_epochs + self.finetune_epochs >= 1, "nothing to train: all epochs are 0"),
            (self.finetune_targets in ("masked", "all"), "--finetune-targets must be masked or all"),
            (0 <= self.anonymous_prompt_ratio < 1, "--anonymous-prompt-ratio must be in [0, 1)"),
            (self.backbone_layers is None or self.backbone_layers >= 1, "--backbone-layers must be at least 1"),
            (self.pretrain_lr > 0 and self.finetune_lr > 0, "learning rates must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


class ConfigError(ValueError):
    """The run's settings cannot work (bad option, --resume of a different run, missing device)."""


# --- batches -------------------------------------------------------------------------------------

def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Random batches of similar lengths: shuffle, sort within windows of 50 batches, shuffle the
    batches. Less padding, so more useful tokens per second, while epochs stay random."""
    order = rng.permutation(len(lengths))
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort([lengths[i] for i in chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collaborative_documents(space: TokenSpace, split: Split, max_items: int, rng: np.random.Generator) -> list[Document]:
    """One document per user with training items, item order reshuffled (stochastic reordering)."""
    documents = []
    for u, items in enumerate(split.train):
        if len(items):
            documents.append(build_collaborative_document(space, u, rng.permutation(items)[:max_items].tolist()))
    return documents


def recommend_examples(space: TokenSpace, split: Split, config: TrainConfig, rng: np.random.Generator):
    """(prompt, targets, user, history) per user: a random mask_ratio of the training items (at least
    one) is held out of the prompt; the rest, shuffled, form the history."""
    examples = []
    for u, items in enumerate(split.train):
        if not len(items):
            continue
        items = rng.permutation(items)
        n_masked = max(1, round(config.mask_ratio * len(items)))
        masked, history = items[:n_masked].tolist(), items[n_masked:].tolist()
        user = None if rng.random() < config.anonymous_prompt_ratio else u
        prompt = build_recommend_prompt(space, user, history, config.max_history)
        targets = masked if config.finetune_targets == "masked" else items.tolist()
        examples.append((prompt, targets, user, history[-config.max_history:]))
    return examples


# --- the loop ------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, config: TrainConfig, dataset: Dataset, split: Split, model: CLLM4Rec, space: TokenSpace,
                 device: torch.device, out: Path):
        self.config = config
        self.dataset = dataset
        self.split = split
        self.model = model
        self.space = space
        self.device = device
        self.out = out
        self.optimizers = {view: make_optimizers(model.tables(view), config.pretrain_lr) for view in (COLLAB, CONTENT)}
        self.content_documents = build_content_documents(space, split.train_reviews(dataset), dataset.item_texts,
                                                         config.max_text_tokens) if config.content else []
        self.val_users = sample_users(evaluation_users(split, "val"), config.val_users, config.seed)
        self.epoch = 0  # epochs completed
        self.best_score = -math.inf
        self.best_metrics: dict = {}
        self.bad_epochs = 0
        self.amp = device.type == "cuda"

    def schedule(self) -> list[str]:
        c = self.config
        content = ["content"] * c.content_epochs if self.content_documents else []
        pretrain = ["pretrain"] * c.pretrain_epochs
        return content + pretrain + ["finetune"] * c.finetune_epochs

    # --- the three passes: batches, one optimizer step, a pass over an epoch's batches -----------
    def batches(self, name: str, rng: np.random.Generator) -> list:
        """One epoch's batches of a pass, grouped by length (fresh item order and masks each epoch)."""
        if name == "recommend":
            examples = recommend_examples(self.space, self.split, self.config, rng)
            return [collate_recommend(*zip(*[examples[i] for i in index]), n_items=self.space.n_items)
                    for index in length_grouped_batches([len(e[0]) for e in examples], self.config.batch_size, rng)]
        if name == "collaborative":
            documents = collaborative_documents(self.space, self.split, self.config.max_history, rng)
            label_offset = self.space.n_words + self.space.n_users
        else:
            documents, label_offset = self.content_documents, 0
        lengths = [len(d.prompt) + len(d.main) for d in documents]
        return [collate_documents([documents[i] for i in index], label_offset)
                for index in length_grouped_batches(lengths, self.config.batch_size, rng)]

    def train_step(self, name: str, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward (bf16 autocast on CUDA), backward and Adam on one batch; returns (nll, regularization)."""
        view = PASS_VIEW[name]
        nll_of = {"collaborative": self.model.collaborative_nll, "content": self.model.content_nll,
                  "recommend": self.model.recommend_nll}[name]
        moved = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(self.device)
                                              for f in dataclasses.fields(batch) if f.name not in ("users", "items")})
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            nll = nll_of(moved)
            reg = self.model.mutual_regularization(view, batch.users.to(self.device), batch.items.to(self.device))
            loss = (nll + self.config.lambda_v * reg) / len(batch.input_ids)
        for optimizer in self.optimizers[view]:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers[view]:
            optimizer.step()
        return nll.detach(), reg.detach()

    def run_pass(self, name: str, rng: np.random.Generator, lr: float) -> dict:
        batches = self.batches(name, rng)
        for optimizer in self.optimizers[PASS_VIEW[name]]:
            for group in optimizer.param_groups:
                group["lr"] = lr
        self.model.train()
        total_nll = total_reg = total_targets = total_tokens = 0.0
        start = time.perf_counter()
        # Progress bars on a terminal only; logs get the one line per epoch that fit() prints.
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1} {name}", leave=False, dynamic_ncols=True, disable=None)
        for batch in bar:
            nll, reg = self.train_step(name, batch)
            total_nll += float(nll)
            total_reg += float(reg)
            total_targets += batch.n_targets
            total_tokens += batch.n_tokens
            elapsed = time.perf_counter() - start
            bar.set_postfix(nll=f"{total_nll / max(total_targets, 1):.3f}",
                            tok_s=f"{total_tokens / max(elapsed, 1e-9):.0f}")
        elapsed = time.perf_counter() - start
        n_documents = sum(len(b.input_ids) for b in batches)
        return {
            "nll_per_target": total_nll / max(total_targets, 1),  # per predicted item or word
            "regularization_per_document": total_reg / max(n_documents, 1),
            "tokens_per_s": total_tokens / max(elapsed, 1e-9),
            "seconds": elapsed,
        }

    def run_epoch(self, stage: str) -> dict:
        c = self.config
        rng = np.random.default_rng([c.seed, 2, self.epoch])  # per epoch: a resumed run replays the same epochs
        passes = {}
        if stage == "content":
            passes["content"] = self.run_pass("content", rng, c.pretrain_lr)
        elif stage == "pretrain":
            passes["collaborative"] = self.run_pass("collaborative", rng, c.pretrain_lr)
            if self.content_documents:
                passes["content"] = self.run_pass("content", rng, c.pretrain_lr)
        else:
            passes["recommend"] = self.run_pass("recommend", rng, c.finetune_lr)
            if self.content_documents and c.finetune_content:
                passes["content"] = self.run_pass("content", rng, c.finetune_lr)
        return passes

    def validate(self) -> dict:
        self.model.eval()  # scoring computes in bf16 on CUDA, as the server does (score_prompts)
        return evaluate_cllm4rec(self.model, self.space, self.split, "val", self.val_users, self.config.max_history,
                                 self.config.eval_batch_size)

    # --- saving ----------------------------------------------------------------------------------
    def save_best(self, metrics: dict) -> None:
        c = self.config
        ckpt.save_checkpoint(
            self.out, self.model, backbone=c.backbone, backbone_layers=self.model.backbone.config.num_hidden_layers,
            templates=self.space.templates, max_history=c.max_history, user_ids=self.dataset.user_ids,
            item_ids=self.dataset.item_ids, item_titles=self.dataset.item_titles, split=self.split,
            data_fingerprint=self.dataset.fingerprint(), train_config=dataclasses.asdict(c), metrics=metrics)

    def save_state(self) -> None:
        """The latest epoch's embeddings and optimizer moments, for --resume."""
        state_dir = self.out / STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save_tensors(state_dir / ckpt.EMBEDDINGS_FILE, ckpt.model_tables(self.model))
        for view, optimizers in self.optimizers.items():
            for n, optimizer in enumerate(optimizers):
                ckpt.save_tensors(state_dir / f"optimizer_{view}_{n}.safetensors", optimizer_tensors(optimizer))
        ckpt.write_json(state_dir / "state.json", {
            "epoch": self.epoch, "best_score": self.best_score, "best_metrics": self.best_metrics,
            "bad_epochs": self.bad_epochs, "data_fingerprint": self.dataset.fingerprint(),
            "backbone": self.config.backbone, "backbone_layers": self.model.backbone.config.num_hidden_layers,
            "n_users": self.space.n_users, "n_items": self.space.n_items,
        })

    def restore_state(self) -> None:
        state_dir = self.out / STATE_DIR
        state_path = state_dir / "state.json"
        if not state_path.exists():
            raise ConfigError(f"--resume: {state_path} not found; nothing to resume in {self.out}")
        state = json.loads(state_path.read_text())
        expected = {"data_fingerprint": self.dataset.fingerprint(), "backbone": self.config.backbone,
                    "backbone_layers": self.model.backbone.config.num_hidden_layers,
                    "n_users": self.space.n_users, "n_items": self.space.n_items}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ConfigError(f"--resume: the run in {self.out} has {key}={state.get(key)!r}, this one {value!r}")
        tables = load_file(state_dir / ckpt.EMBEDDINGS_FILE)
        with torch.no_grad():
            for name in ckpt.TABLES:
                getattr(self.model, name).weight.copy_(tables[name])
        for view, optimizers in self.optimizers.items():
            for n, optimizer in enumerate(optimizers):
                load_optimizer_tensors(optimizer, load_file(state_dir / f"optimizer_{view}_{n}.safetensors"))
        self.epoch, self.best_score = state["epoch"], state["best_score"]
        self.best_metrics, self.bad_epochs = state["best_metrics"], state["bad_epochs"]

    # --- the whole run ---------------------------------------------------------------------------
    def fit(self) -> dict:
        schedule = self.schedule()
        if self.epoch >= len(schedule):
            print(f"all {len(schedule)} epochs already done")
        seconds: dict[str, list[float]] = {}  # per stage, for the time-left estimate
        for stage in schedule[self.epoch :]:
            if stage == "finetune" and self.bad_epochs >= self.config.patience:
                print(f"early stop: no improvement in {self.bad_epochs} epochs")
                break
            started = time.perf_counter()
            passes = self.run_epoch(stage)
            metrics = self.validate()
            seconds.setdefault(stage, []).append(time.perf_counter() - started)
            score = selection_score(metrics)
            improved = score > self.best_score
            self.epoch += 1
            record = {"epoch": self.epoch, "stage": stage, "passes": passes, "val": metrics, "score": score,
                      "best": improved, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with defer_interrupt():
                if improved:
                    self.best_score, self.best_metrics = score, {"epoch": self.epoch, "stage": stage, "val": metrics}
                    self.save_best(self.best_metrics)
                if stage == "finetune":
                    self.bad_epochs = 0 if improved else self.bad_epochs + 1
                self.save_state()
                ckpt.append_metrics(self.out, record)
            losses = " ".join(f"{k} nll={v['nll_per_target']:.3f} ({v['tokens_per_s']:.0f} tok/s)"
                              for k, v in passes.items())
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            print(f"epoch {self.epoch}/{len(schedule)} {stage}: {losses} | val {shown}{' *best*' if improved else ''}"
                  f" | {time_left(schedule[self.epoch:], seconds)}", flush=True)
        return self.best_metrics


def time_left(remaining: Sequence[str], seconds: dict[str, list[float]]) -> str:
    """'about 2.5 h left', from the mean time of the epochs of each stage so far (early stopping may end sooner)."""
    if not remaining:
        return "done"
    untimed = sorted({stage for stage in remaining if stage not in seconds})
    total = sum(np.mean(seconds[stage]) for stage in remaining if stage in seconds)
    text = f"{total / 3600:.1f} h" if total >= 3600 else f"{total / 60:.0f} min"
    return f"about {text} left" + (f" + {', '.join(untimed)} epochs not yet timed" if untimed else "")


def initialize_from_text(model: CLLM4Rec, tokenizer, dataset: Dataset, split: Split, max_tokens: int = 32) -> int:
    """Start items with a title (or text) at the mean word embedding of its first max_tokens words,
    and users with training items at the mean of those items; both views alike. Returns how many
    items had text.

    The backbone then reads an item token as a blend of its title's words from the first step, and
    with a tied LM head an item's initial score is about the LM's logit for its title words: a
    sensible zero-shot ranking instead of noise. The paper starts from N(0, 0.02) and learns the
    same from the content LM over many epochs, which a CPU budget cannot afford."""
    texts = [title or text for title, text in zip(dataset.item_titles, dataset.item_texts)]
    described = [i for i, text in enumerate(texts) if text]
    if not described:
        return 0
    words = model.backbone.get_input_embeddings().weight.detach()
    token_ids = tokenizer([texts[i] for i in described], add_special_tokens=False, truncation=True,
                          max_length=max_tokens)["input_ids"]
    with torch.no_grad():
        for item, ids in zip(described, token_ids):
            if ids:
                vector = words[torch.as_tensor(ids, device=words.device)].float().mean(0)
                model.collab_items.weight[item] = vector
                model.content_items.weight[item] = vector
        for user, items in enumerate(split.train):
            if len(items):
                vector = model.collab_items.weight[torch.as_tensor(items, device=words.device)].mean(0)
                model.collab_users.weight[user] = vector
                model.content_users.weight[user] = vector
    return len(described)


def make_optimizers(tables, lr: float) -> list[torch.optim.Optimizer]:
    """Adam for the tables of one view: lazy (SparseAdam) for sparse tables, fused Adam for dense ones.

    Lazy Adam updates only the rows in the batch, so a step costs the same for 1k or 1M users,
    instead of dominating the step time of small batches on a CPU."""
    sparse = [t.weight for t in tables if t.sparse]
    dense = [t.weight for t in tables if not t.sparse]
    optimizers: list[torch.optim.Optimizer] = []
    if sparse:
        optimizers.append(torch.optim.SparseAdam(sparse, lr=lr))
    if dense:
        optimizers.append(torch.optim.Adam(dense, lr=lr, fused=True))
    return optimizers


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value)
    return tensors


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


@contextlib.contextmanager
def defer_interrupt() -> Iterator[None]:
    """Ctrl-C during a save waits for the save to finish, so the last good checkpoint stays whole."""
    received = []
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    except ValueError:  # not the main thread: signals go elsewhere anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def train(config: TrainConfig) -> dict:
    """Train from config.data into config.out; returns the best validation metrics."""
    config.validate()
    device = resolve_device(config.device)
    out = Path(config.out)
    if not config.resume and (out / ckpt.META_FILE).exists():
        raise ConfigError(f"{out} already holds a checkpoint: pass --resume to continue it, or another --out")
    dataset = load_dataset(config.data)
    for line in dataset.report:
        print(f"data: {line}")
    split = split_dataset(dataset, config.seed, config.val_fraction, config.test_fraction)
    n_eval = len(evaluation_users(split, "val"))
    print(f"data: {dataset.n_users} users, {dataset.n_items} items, {len(dataset.interactions)} interactions, "
          f"{len(dataset.reviews)} reviews, {sum(1 for t in dataset.item_texts if t)} item texts; "
          f"{dataset.n_users - n_eval} users with fewer than 3 interactions are training-only")
    backbone, tokenizer = load_backbone(config.backbone, config.backbone_layers, device)
    torch.manual_seed(config.seed)
    model = CLLM4Rec(backbone, dataset.n_users, dataset.n_items, config.init_std).to(device)
    space = TokenSpace(tokenizer, model.n_words, dataset.n_users, dataset.n_items, PromptTemplates())
    if config.text_init:
        described = initialize_from_text(model, tokenizer, dataset, split)
        print(f"init: {described} items from their titles, users from their training items"
              if described else "init: no item text; all tokens from N(0, init_std)")
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, dataset, split, model, space, device, out)
    if not config.content:
        print("content LM off (--no-content): only the collaborative and recommendation stages run")
    elif not trainer.content_documents:
        print("data: no review or item text: the content stages are skipped")
    elif config.backbone_layers is not None:
        # Measured on SmolLM2: title words cost 17-20 nats each from the first 4-16 layers, 4.8 from all 30.
        print(f"note: the frozen LM head reads layer {config.backbone_layers}, not the last one; its word "
              "predictions are poor there, so the content LM teaches little (consider --no-content)")
    if device.type == "cuda" and config.batch_size < GPU_FLAT_BATCH:
        print(f"note: on a GPU a step of the backbone is bound by kernel launches: it took about as long at "
              f"batch {GPU_FLAT_BATCH} as at 32 on an H200; a larger --batch-size (256+) trains faster per "
              "token (docs/training.md)")
    if config.resume:
        trainer.restore_state()
        print(f"resuming after epoch {trainer.epoch}")
    print(f"backbone {config.backbone} ({backbone.config.num_hidden_layers} layers) on {device}; "
          f"{len(trainer.content_documents)} content documents; checkpoint: {out}")
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        best = trainer.best_metrics.get("epoch")
        print(f"\ninterrupted after epoch {trainer.epoch}. "
              + (f"The best checkpoint (epoch {best}) is in {out}; " if best else "No checkpoint was saved yet; ")
              + "continue with the same command and --resume.")
        raise
