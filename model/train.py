"""Training: alternating pretraining with mutual regularization, then recommendation finetuning.

    content epochs   content LM only (reviews and item text)                 paper: 10
    pretrain epochs  one collaborative LM pass, then one content LM pass,     paper: 100
                     each regularised towards the other view (lambda_V)
    finetune epochs  recommendation pass (masked history -> held-out items),  paper: 150
                     then a content LM pass, mutual regularization throughout

Every epoch that trains the collaborative view ends with validation (Recall@20, Recall@40, NDCG@100
on the validation part); content-only epochs do not change what is scored, so they are not
validated. The checkpoint directory always holds the best epoch so far, and train_state/ the latest
one, which `--resume` continues from. Finetuning stops early after `patience` epochs without
improvement, and the whole run at `time_budget` minutes (the epoch in progress ends early, is
validated, and the best checkpoint stays). Finetuning starts with fresh Adam moments (as the
authors' code does): pretraining's moments describe another loss.

Every stage's loss is  nll / targets + lambda_V * regularization / documents: the likelihood per
predicted item or word (token-averaged, as in the authors' code), plus lambda_V times the summed
squared distance between the two views' embeddings of a document's soft tokens, per document.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from model import checkpoint as ckpt
from model.backbone import load_backbone
from model.batches import collaborative_documents, length_grouped_batches, recommend_examples
from model.cllm4rec import COLLAB, CONTENT, CLLM4Rec, collate_documents, collate_recommend
from model.config import ConfigError, TrainConfig, resolve_device
from model.data import Dataset, Split, load_dataset, split_dataset
from model import distributed
from model.distributed import Ranks, broadcast_object, broadcast_parameters, share, sum_across, sum_gradients
from model.evaluate import evaluate_cllm4rec, evaluation_users, sample_users, selection_score
from model.head_readout import REFIT_SHARES, estimate_refit_seconds, mix_heads, refit_head, refitted_parameters
from model.initialise import initialise
from model.optimisation import (decay_rows, load_optimizer_tensors, make_optimizers, optimizer_tensors,
                                scheduled_lr, set_lr)
from model.onnx_backbone import use_engine
from model.precision import autocast, autocast_dtype, slow_bf16_note
from model.prompts import PromptTemplates, TokenSpace, build_content_documents
from model.teachers import Teacher, fit_teacher, teacher_texts

log = logging.getLogger(__name__)
STATE_DIR = "train_state"
TENSORBOARD_DIR = "tensorboard"
# Up to this batch size a full-depth SmolLM2 step took the same time on an H200 (docs/benchmarks.md).
GPU_FLAT_BATCH = 128
# Which view's user/item tables each pass trains (and whose optimizers step).
PASS_VIEW = {"collaborative": COLLAB, "content": CONTENT, "recommend": COLLAB}


# --- the loop ------------------------------------------------------------------------------------

class EpochBatches(Sequence):
    """An epoch's batches, each collated when it is taken (None for an empty share): a recommendation
    batch's targets are a dense [batch, items] matrix, and a whole epoch of them would hold users x
    items floats at once (640 MB at 20k users and 8k items, measured)."""

    def __init__(self, shares: list[np.ndarray], collate: Callable[[np.ndarray], object]):
        self.shares, self.collate = shares, collate

    def __len__(self) -> int:
        return len(self.shares)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.collate(self.shares[i]) if len(self.shares[i]) else None


class Trainer:
    def __init__(self, config: TrainConfig, dataset: Dataset, split: Split, model: CLLM4Rec, space: TokenSpace,
                 device: torch.device, out: Path, teacher: Teacher | None = None, started: float | None = None,
                 ranks: Ranks = Ranks()):
        self.config = config
        self.ranks = ranks  # torchrun's processes (model.distributed); rank 0 validates and writes
        self.dataset = dataset
        self.split = split
        self.model = model
        self.space = space
        self.device = device
        self.out = out
        self.teacher = teacher
        self.optimizers = {view: self.new_optimizers(view) for view in (COLLAB, CONTENT)}
        self.content_documents = build_content_documents(space, split.train_reviews(dataset), dataset.item_texts,
                                                         config.max_text_tokens) if config.content else []
        self.val_users = sample_users(evaluation_users(split, "val"), config.val_users, config.seed)
        self.epoch = 0  # epochs completed
        self.finetune_steps = 0  # optimizer steps of finetuning so far (the lr schedule's clock)
        self.best_score = -math.inf
        self.best_metrics: dict = {}
        self.bad_epochs = 0
        self.autocast_dtype = autocast_dtype(device, config.autocast)  # bf16 or None (model/precision.py)
        started = time.monotonic() if started is None else started
        self.deadline = started + 60 * config.time_budget if config.time_budget else math.inf
        self.validation_seconds = 0.0  # the last validation's duration: a budget keeps room for one more
        self.head_refit_seconds: float | None = None  # the refit's estimate (refit_seconds), timed when first asked
        self.finetune_started: float | None = None  # when this process began finetuning (the budget's share)
        self.out_of_time = False
        self.interrupted = False  # Ctrl-C or SIGTERM under torchrun: every rank stops at the same step
        self.writer = None  # TensorBoard, opened by fit()
        model.input_gradients = config.input_gradients

    def new_optimizers(self, view: str) -> list[torch.optim.Optimizer]:
        c = self.config
        head = self.model.head_parameters(c.head_bias, c.head_adapter) if view == COLLAB else []
        return make_optimizers(self.model.tables(view), c.pretrain_lr, head, c.weight_decay if view == COLLAB else 0.0)

    def schedule(self) -> list[str]:
        c = self.config
        content = ["content"] * c.content_epochs if self.content_documents else []
        pretrain = ["pretrain"] * c.pretrain_epochs
        return content + pretrain + ["finetune"] * c.finetune_epochs

    # --- the three passes: batches, one optimizer step, a pass over an epoch's batches -----------
    def batches(self, name: str, rng: np.random.Generator) -> EpochBatches:
        """One epoch's batches of a pass, grouped by length (fresh item order and masks each epoch)."""
        c = self.config
        if name == "recommend":
            examples = recommend_examples(self.space, self.split, c.mask_ratio, c.finetune_targets,
                                          c.anonymous_prompt_ratio, c.max_history, rng, c.unmasked_prompt_ratio)
            return EpochBatches(self.shares([len(e[0]) for e in examples], rng), lambda index: collate_recommend(
                *zip(*[examples[i] for i in index]), n_items=self.space.n_items))
        if name == "collaborative":
            documents = collaborative_documents(self.space, self.split, c.max_history, rng)
            label_offset = self.space.n_words + self.space.n_users
        else:
            documents, label_offset = self.content_documents, 0
        lengths = [len(d.prompt) + len(d.main) for d in documents]
        return EpochBatches(self.shares(lengths, rng),
                            lambda index: collate_documents([documents[i] for i in index], label_offset))

    def shares(self, lengths: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
        """This rank's examples of each step: every rank draws the same batches of batch_size x world
        examples and takes its share of each (all of it in one process); a share may be empty."""
        batches = length_grouped_batches(lengths, self.config.batch_size * self.ranks.world, rng)
        return [share(index, self.ranks) for index in batches]

    def with_teacher(self, batch):
        """The batch with the teacher's targets: distill_weight x (the prompt's number of targets) x the
        teacher's distribution over the items not in the prompt; none for prompts without history."""
        c = self.config
        if self.teacher is None or not c.distill_weight:
            return batch
        weights = c.distill_weight * batch.targets.sum(1, keepdim=True)
        weights *= torch.as_tensor([[bool(h)] for h in batch.histories], dtype=weights.dtype)
        return dataclasses.replace(batch, teacher=weights * self.teacher.distribution(batch.histories,
                                                                                     c.distill_temperature))

    def train_step(self, name: str, batch, n_targets: float | None = None, n_documents: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward (bf16 autocast where --autocast says), backward and Adam on one batch; returns (nll,
        regularization), both summed over the batch (nll includes the distillation term when there is a
        teacher).

        n_targets and n_documents count the whole step, all ranks' shares (model.distributed; default:
        the batch's own): the loss is divided by them and the ranks' gradients are summed. `batch` is
        None for a rank whose share of the step is empty: it adds nothing and still takes the step."""
        if batch is not None:
            n_targets = batch.n_targets if n_targets is None else n_targets
            n_documents = len(batch.input_ids) if n_documents is None else n_documents
        view = PASS_VIEW[name]
        for optimizer in self.optimizers[view]:
            optimizer.zero_grad(set_to_none=True)
        if batch is None:
            nll = reg = torch.zeros((), device=self.device)
        else:
            nll, reg = self.backward(name, batch, n_targets, n_documents)
        sum_gradients(self.optimizers[view], self.ranks)
        for optimizer in self.optimizers[view]:
            optimizer.step()
        weight_decay = self.config.weight_decay if view == COLLAB else 0.0
        if weight_decay:  # of the rows the step trained, every rank's: those with a gradient
            decay_rows([(t, t.weight.grad.coalesce().indices()[0]) for t in self.model.tables(view)
                        if t.sparse and t.weight.grad is not None],
                       self.optimizers[view][0].param_groups[0]["lr"], weight_decay)
        return nll, reg

    def backward(self, name: str, batch, n_targets: float, n_documents: float) -> tuple[torch.Tensor, torch.Tensor]:
        view = PASS_VIEW[name]
        nll_of = {"collaborative": self.model.collaborative_nll, "content": self.model.content_nll,
                  "recommend": self.model.recommend_nll}[name]
        if name == "recommend":
            batch = self.with_teacher(batch)
        moved = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).to(self.device)
                                              for f in dataclasses.fields(batch)
                                              if isinstance(getattr(batch, f.name), torch.Tensor)})
        with autocast(self.device, self.autocast_dtype):
            nll = nll_of(moved)
            reg = self.model.mutual_regularization(view, moved.users, moved.items)
            loss = stage_loss(nll, reg, n_targets, n_documents, self.config.lambda_v)
        loss.backward()
        return nll.detach(), reg.detach()

    def finetune_lr(self, time_progress: float) -> float:
        """This step's finetuning lr: warm-up, then constant or cosine over the finetuning epochs or,
        with a time budget, over the time left (time_progress, agreed by the ranks), whichever runs out first."""
        c = self.config
        steps_per_epoch = math.ceil(len(self.split.train) / (c.batch_size * self.ranks.world))
        progress = max(self.finetune_steps / max(c.finetune_epochs * steps_per_epoch, 1), time_progress)
        return scheduled_lr(c.finetune_lr, c.lr_schedule, self.finetune_steps, c.warmup_steps, progress, c.lr_floor)

    def budget_progress(self) -> float:
        """The share of the time budget that finetuning has used (0 without a budget)."""
        now = time.monotonic()
        if self.finetune_started is None:
            self.finetune_started = now
        if not math.isfinite(self.deadline):
            return 0.0
        return (now - self.finetune_started) / max(self.deadline - self.finetune_started, 1e-9)

    def time_is_up(self) -> bool:
        """Past the budget once the time for one more validation (and the head's refit) is set aside."""
        if math.isfinite(self.deadline) and \
                time.monotonic() + self.validation_seconds + self.refit_seconds() >= self.deadline:
            self.out_of_time = True
        return self.out_of_time

    def refit_seconds(self) -> float:
        """The time --head-refit will take: the refit itself, timed on one of its batches the first time
        the budget asks (model/head_readout.py), then a validation per share of the refit."""
        if not (self.config.head_refit and self.teacher is not None):
            return 0.0
        if self.head_refit_seconds is None:
            c = self.config
            self.head_refit_seconds = estimate_refit_seconds(
                self.model, self.space, self.split, self.teacher, c.distill_temperature, c.distill_weight,
                c.max_history, c.eval_batch_size)
        return self.head_refit_seconds + self.validation_seconds * len(REFIT_SHARES)

    def agree(self, batch, name: str) -> tuple[float, float, float] | None:
        """The step's (targets, documents, budget progress) over all ranks, from one all-reduce that also
        carries each rank's stop votes: None when the time budget is up (on every rank alike), and
        KeyboardInterrupt on every rank alike when any was interrupted."""
        n_targets = batch.n_targets if batch is not None else 0
        n_documents = len(batch.input_ids) if batch is not None else 0
        progress = self.budget_progress() if name == "recommend" else 0.0
        targets, documents, progress, late, interrupted = sum_across(
            [n_targets, n_documents, progress, self.time_is_up(), self.interrupted], self.ranks, self.device)
        if interrupted:
            raise KeyboardInterrupt
        if late:
            self.out_of_time = True
            return None
        return targets, documents, progress / self.ranks.world

    def run_pass(self, name: str, rng: np.random.Generator, lr: float) -> dict:
        batches = self.batches(name, rng)
        optimizers = self.optimizers[PASS_VIEW[name]]
        set_lr(optimizers, lr)
        self.model.train()
        total_nll = total_reg = total_targets = total_tokens = 0.0
        n_documents = 0
        start = time.perf_counter()
        # Progress bars on a terminal only; logs get the one line per epoch that fit() prints.
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1} {name}", leave=False, dynamic_ncols=True,
                   disable=None if self.ranks.is_main else True)
        for batch in bar:
            agreed = self.agree(batch, name)
            if agreed is None:
                break
            step_targets, step_documents, progress = agreed
            if name == "recommend":
                set_lr(optimizers, self.finetune_lr(progress))
            nll, reg = self.train_step(name, batch, step_targets, step_documents)
            if name == "recommend":
                self.finetune_steps += 1
            total_nll += float(nll)
            total_reg += float(reg)
            if batch is not None:
                total_targets += batch.n_targets
                total_tokens += batch.n_tokens
                n_documents += len(batch.input_ids)
            elapsed = time.perf_counter() - start
            bar.set_postfix(nll=f"{total_nll / max(total_targets, 1):.3f}",
                            tok_s=f"{total_tokens / max(elapsed, 1e-9):.0f}")
        bar.close()
        elapsed = time.perf_counter() - start
        # The pass's figures over all ranks (tokens/s of the whole job).
        total_nll, total_reg, total_targets, total_tokens, n_documents = sum_across(
            [total_nll, total_reg, total_targets, total_tokens, n_documents], self.ranks, self.device)
        return {
            "nll_per_target": total_nll / max(total_targets, 1),  # per predicted item or word (+ distillation)
            "regularization_per_document": total_reg / max(n_documents, 1),
            "tokens_per_s": total_tokens / max(elapsed, 1e-9),
            "seconds": elapsed,
            "lr": optimizers[0].param_groups[0]["lr"],
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
        """Rank 0 scores the validation users; every rank gets its metrics (and how long it took)."""
        metrics = None
        if self.ranks.is_main:
            self.model.eval()  # scoring computes in bf16 on CUDA, as the server does (score_prompts)
            started = time.monotonic()
            metrics = evaluate_cllm4rec(self.model, self.space, self.split, "val", self.val_users,
                                        self.config.max_history, self.config.eval_batch_size)
            self.validation_seconds = time.monotonic() - started
        metrics, self.validation_seconds = broadcast_object((metrics, self.validation_seconds), self.ranks)
        return metrics

    # --- saving ----------------------------------------------------------------------------------
    def save_best(self, metrics: dict) -> None:
        c = self.config
        ckpt.save_checkpoint(
            self.out, self.model, backbone=c.backbone, backbone_layers=self.model.backbone.config.num_hidden_layers,
            templates=self.space.templates, max_history=c.max_history, user_ids=self.dataset.user_ids,
            item_ids=self.dataset.item_ids, item_titles=self.dataset.item_titles,
            item_texts=self.dataset.item_texts, split=self.split,
            data_fingerprint=self.dataset.fingerprint(), train_config=dataclasses.asdict(c), metrics=metrics)

    def save_state(self) -> None:
        """The latest epoch's embeddings and optimizer moments, for --resume."""
        state_dir = self.out / STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save_tensors(state_dir / ckpt.EMBEDDINGS_FILE, ckpt.model_tensors(self.model))
        for view, optimizers in self.optimizers.items():
            for n, optimizer in enumerate(optimizers):
                ckpt.save_tensors(state_dir / f"optimizer_{view}_{n}.safetensors", optimizer_tensors(optimizer))
        ckpt.write_json(state_dir / "state.json", {
            "epoch": self.epoch, "best_score": self.best_score, "best_metrics": self.best_metrics,
            "bad_epochs": self.bad_epochs, "finetune_steps": self.finetune_steps,
            "data_fingerprint": self.dataset.fingerprint(),
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
        ckpt.load_model_tensors(self.model, load_file(state_dir / ckpt.EMBEDDINGS_FILE))
        for view, optimizers in self.optimizers.items():
            for n, optimizer in enumerate(optimizers):
                load_optimizer_tensors(optimizer, load_file(state_dir / f"optimizer_{view}_{n}.safetensors"))
        self.epoch, self.best_score = state["epoch"], state["best_score"]
        self.best_metrics, self.bad_epochs = state["best_metrics"], state["bad_epochs"]
        self.finetune_steps = state.get("finetune_steps", 0)

    # --- the whole run ---------------------------------------------------------------------------
    def fit(self) -> dict:
        # Imported here, not at the top: the server imports this module (quickstart) and never writes curves.
        from tensorboardX import SummaryWriter

        schedule = self.schedule()
        if self.epoch >= len(schedule):
            print(f"all {len(schedule)} epochs already done")
        first_finetune = schedule.index("finetune") if "finetune" in schedule else len(schedule)
        seconds: dict[str, list[float]] = {}  # per stage, for the time-left estimate
        self.writer = SummaryWriter(str(self.out / TENSORBOARD_DIR)) if self.ranks.is_main else None
        try:
            for stage in schedule[self.epoch :]:
                if stage == "finetune" and self.config.patience and self.bad_epochs >= self.config.patience:
                    print(f"early stop: no improvement in {self.bad_epochs} epochs")
                    break
                if self.agree(None, stage) is None:  # the time budget, as every rank sees it
                    break
                if self.epoch == first_finetune:  # finetuning starts with fresh Adam moments
                    self.optimizers[COLLAB] = self.new_optimizers(COLLAB)
                started = time.perf_counter()
                passes = self.run_epoch(stage)
                # Content-only epochs leave the collaborative model, which is what is scored, unchanged.
                metrics = self.validate() if stage != "content" else None
                seconds.setdefault(stage, []).append(time.perf_counter() - started)
                self.end_epoch(stage, passes, metrics, schedule, seconds)
            if self.out_of_time:
                print(f"time budget of {self.config.time_budget:g} min reached after epoch {self.epoch}")
            # Also when the budget left no finetuning epoch: the refit of the starting model reads out well.
            if self.config.head_refit and self.teacher is not None and "finetune" in schedule:
                self.refit()
            if self.best_metrics:
                print(f"the best checkpoint ({self.best_metrics['stage']}, epoch {self.best_metrics['epoch']}) "
                      f"is in {self.out}")
        finally:
            if self.writer is not None:
                self.writer.close()
        return self.best_metrics

    def refit(self) -> None:
        """--head-refit: the head's offsets and bias refitted in closed form on the best epoch's model
        (model/head_readout.py), mixed with the trained ones in each of REFIT_SHARES, each validated;
        the best is kept as the checkpoint when it beats the best epoch.

        The best epoch's, not the last: the mixes start from the head the checkpoint holds. (Whether the
        readout of a later, overfitted epoch is worse is not settled: on amazon-scientific one run's
        refit of its epoch 17 and another's of its best epoch 11 validated alike, docs/training.md.)"""
        c = self.config
        started = time.monotonic()
        epoch = self.best_metrics.get("epoch", self.epoch)
        if epoch != self.epoch:
            if self.ranks.is_main:
                ckpt.load_model_tensors(self.model, ckpt.read_checkpoint(self.out).embeddings)
            broadcast_parameters([p for p in self.model.parameters() if p.requires_grad], self.ranks)
        trained = tuple(p.detach().clone() for p in refitted_parameters(self.model))
        refit_head(self.model, self.space, self.split, self.teacher, c.distill_temperature, c.distill_weight,
                   c.max_history, c.eval_batch_size)
        refitted = tuple(p.detach().clone() for p in refitted_parameters(self.model))
        if self.ranks.is_main:
            print(f"head refitted in closed form on epoch {epoch}'s model ({time.monotonic() - started:.0f} s)")
        kept = 0.0
        for refit_share in REFIT_SHARES:
            mix_heads(self.model, trained, refitted, refit_share)
            metrics = self.validate()
            score = selection_score(metrics)
            improved = score > self.best_score
            if improved:
                kept, self.best_score = refit_share, score
                self.best_metrics = {"epoch": epoch, "stage": "refit", "share": refit_share, "val": metrics}
            if not self.ranks.is_main:
                continue
            with defer_interrupt() if not self.ranks.parallel else contextlib.nullcontext():
                if improved:
                    self.save_best(self.best_metrics)
                ckpt.append_metrics(self.out, {"epoch": epoch, "stage": "refit", "share": refit_share,
                                               "val": metrics, "score": score, "best": improved,
                                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            print(f"  {refit_share:g} of the refit: val {shown}{' *best*' if improved else ''}", flush=True)
        mix_heads(self.model, trained, refitted, kept)  # the model as the checkpoint holds it

    def end_epoch(self, stage: str, passes: dict, metrics: dict | None, schedule: list[str],
                  seconds: dict[str, list[float]]) -> None:
        """Count the epoch, keep the best checkpoint and the state, log the epoch (stdout, metrics.jsonl,
        TensorBoard)."""
        self.epoch += 1
        score = selection_score(metrics) if metrics else None
        improved = score is not None and score > self.best_score
        record = {"epoch": self.epoch, "stage": stage, "passes": passes, "val": metrics, "score": score,
                  "best": improved, "partial": self.out_of_time, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if improved:
            self.best_score, self.best_metrics = score, {"epoch": self.epoch, "stage": stage, "val": metrics}
        if stage == "finetune":
            self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if not self.ranks.is_main:
            return
        # Under torchrun Ctrl-C only raises a flag (train()), so there is nothing to defer.
        with defer_interrupt() if not self.ranks.parallel else contextlib.nullcontext():
            if improved:
                self.save_best(self.best_metrics)
            self.save_state()
            ckpt.append_metrics(self.out, record)
        for name, values in passes.items():
            self.writer.add_scalar(f"loss/{name}", values["nll_per_target"], self.epoch)
            self.writer.add_scalar(f"regularization/{name}", values["regularization_per_document"], self.epoch)
            self.writer.add_scalar(f"lr/{name}", values["lr"], self.epoch)
        for name, value in (metrics or {}).items():  # TensorBoard tags take no '@': val/recall_20
            self.writer.add_scalar(f"val/{name.replace('@', '_')}", value, self.epoch)
        self.writer.flush()
        losses = " ".join(f"{k} nll={v['nll_per_target']:.3f} ({v['tokens_per_s']:.0f} tok/s)"
                          for k, v in passes.items())
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items()) if metrics else "not validated (content only)"
        print(f"epoch {self.epoch}/{len(schedule)} {stage}: {losses} | val {shown}{' *best*' if improved else ''}"
              f" | {time_left(schedule[self.epoch:], seconds, self.deadline - time.monotonic())}", flush=True)


def stage_loss(nll: torch.Tensor, reg: torch.Tensor, n_targets: int, n_documents: int, lambda_v: float) -> torch.Tensor:
    """The loss of every stage: the negative log-likelihood per target plus lambda_V times the mutual
    regularization per document, so --lambda-v weighs the same two means on every stage."""
    return nll / max(n_targets, 1) + lambda_v * reg / n_documents


def time_left(remaining: Sequence[str], seconds: dict[str, list[float]], budget_left: float = math.inf) -> str:
    """'about 2.5 h left', from the mean time of the epochs of each stage so far, or the time budget's
    rest when that is shorter (early stopping may end sooner)."""
    if not remaining or budget_left <= 0:
        return "done"
    untimed = sorted({stage for stage in remaining if stage not in seconds})
    total = sum(np.mean(seconds[stage]) for stage in remaining if stage in seconds)
    if budget_left < total:
        return f"about {budget_left / 60:.0f} min left (time budget)"
    text = f"{total / 3600:.1f} h" if total >= 3600 else f"{total / 60:.0f} min"
    return f"about {text} left" + (f" + {', '.join(untimed)} epochs not yet timed" if untimed else "")


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


def train(config: TrainConfig) -> dict:
    """Train from config.data into config.out; returns the best validation metrics.

    Under torchrun every process runs this, as one rank of a data-parallel job (model.distributed):
    rank 0 prints, validates, writes and returns the metrics (the other ranks return {}); Ctrl-C and
    SIGTERM raise a flag that all ranks act on at the same step."""
    config.validate()
    device = resolve_device(config.device)
    ranks = distributed.start(device.type)
    try:
        if ranks.is_main:
            return _train(config, ranks.device(device), ranks)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # progress is rank 0's to print
            _train(config, ranks.device(device), ranks)
        return {}
    finally:
        distributed.stop(ranks)


def _train(config: TrainConfig, device: torch.device, ranks: Ranks) -> dict:
    started = time.monotonic()  # a time budget counts data loading, the teacher and initialisation too
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
    model = CLLM4Rec(backbone, dataset.n_users, dataset.n_items, config.init_std,
                     head_offsets=config.head_offsets, head_readout=config.head_readout).to(device)
    if config.adapter_rank:
        try:
            model.attach_adapters(config.adapter_rank, config.adapter_layers, config.adapter_targets)
        except ValueError as e:  # a backbone without nn.Linear maps to adapt
            raise ConfigError(str(e)) from e
    space = TokenSpace(tokenizer, model.n_words, dataset.n_users, dataset.n_items, PromptTemplates())
    note = use_engine(model, config.inference_engine, device)
    if note:
        print(note)
    if not config.resume:
        print(initialise(model, config.init, tokenizer, dataset, split, config.init_rank or model.hidden_size,
                         config.seed))
    teacher = None
    if config.distill_weight and config.finetune_epochs:
        teacher_started = time.monotonic()
        texts = teacher_texts(dataset, split) if config.teacher_text else ()
        teacher = fit_teacher(split, dataset.n_items, config.distill_lambda or None, config.teacher_max_items,
                              config.teacher_rank, sample_users(evaluation_users(split, "val"), 1000, config.seed),
                              texts, config.teacher_text_weight or None, config.seed)
        print(f"teacher: {teacher.kind} (lambda {teacher.lam:g}, text weight {teacher.text_weight:g}) fitted on "
              f"the training part in "
              f"{time.monotonic() - teacher_started:.0f} s; mean best score {teacher.top1:.4g}")
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, dataset, split, model, space, device, out, teacher, started, ranks)
    if not config.content:
        print("content LM off (--no-content): only the collaborative and recommendation stages run")
    elif not trainer.content_documents:
        print("data: no review or item text: the content stages are skipped")
    elif config.backbone_layers is not None:
        # Measured on SmolLM2: title words cost 17-20 nats each from the first 4-16 layers, 4.8 from all 30.
        print(f"note: the frozen LM head reads layer {config.backbone_layers}, not the last one; its word "
              "predictions are poor there, so the content LM teaches little (consider --no-content)")
    note = slow_bf16_note(device, trainer.autocast_dtype)
    if note:
        print(note)
    if device.type == "cuda" and config.batch_size < GPU_FLAT_BATCH:
        print(f"note: on a GPU a step of the backbone is bound by kernel launches: it took about as long at "
              f"batch {GPU_FLAT_BATCH} as at 32 on an H200; a larger --batch-size (256+) trains faster per "
              "token (docs/training.md)")
    if config.resume:
        trainer.restore_state()
        print(f"resuming after epoch {trainer.epoch}")
    # Every rank starts from rank 0's tokens (initialisation is seeded, this makes sure).
    broadcast_parameters([p for p in model.parameters() if p.requires_grad], ranks)
    if ranks.parallel:
        def stop_together(*_):
            trainer.interrupted = True
        signal.signal(signal.SIGINT, stop_together)
        signal.signal(signal.SIGTERM, stop_together)
        print(f"data parallel: {ranks.world} ranks ({torch.distributed.get_backend()}), "
              f"{config.batch_size} examples each per step")
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
