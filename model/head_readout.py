"""The item head refitted in closed form: the best linear readout of the trained model's features towards the teacher.

After finetuning, the head's output vectors are what gradient steps on masked prompts made of them. A
least-squares readout, from the features the head reads on the served prompt to the logits of
finetuning's target, fits them exactly in one forward pass over the training users:

    f_u   logit_scale * (head_projection @ h_u), h_u the last hidden state of user u's prompt with the
          whole training history (the prompt that validation and serving use), and with --head-readout
          the readout states (the states at the prompt's end after every inner block, the mean over
          its item positions of every layer's states)
    s_u   the logits of finetuning's target distribution for that prompt, minus their mean (a softmax
          ignores a user's constant), over their standard deviation (each user weighs alike): the
          teacher's logits (its scores at the distillation temperature) for the items not in the
          prompt, which hold distill_weight / (1 + distill_weight) of the target, and for the prompt's
          own items (the multinomial targets, the rest, equally shared) the logit that gives them that
          share
    [W; b] = argmin sum_u ||W f_u + b - s_u||^2 + sum_blocks ridge_k ||W_k||^2   (W: items x features, b: items)

and logit_j = f . (e_j + offset_j) + b_j (+ readout states . readout_j), so the refit sets offset_j =
W_j - e_j on the last state's block, readout_j on the rest and bias_j = b_j: the tied item embeddings e_j
stay the prompt's input tokens, the offsets untie the head's side (--head-offsets). Training users only, scored by a teacher fitted on the training part: no validation
or test item reaches it. Measured in docs/training.md ("The head refitted in closed form").
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.cllm4rec import CLLM4Rec, inference_autocast, pad
from model.data import Split
from model.prompts import TokenSpace, build_recommend_prompt
from model.teachers import Teacher

# Ridge of the readout, relative to the mean diagonal of each hidden-wide block of the features' Gram
# matrix (layers' states differ in scale by orders of magnitude): users far outnumber the features, so it
# only guards the solve; the readout's validation figures were flat from about 4e-9 to 4e-6 of that scale
# on amazon-scientific, and fell by 1-3% at 1e-4 with the readout states on both datasets.
RELATIVE_RIDGE = 1e-6
# How much of the refit the head takes, (1 - share) x the trained head + share x the refit, each
# validated (the trained head is share 0): the whole refit was best on amazon-scientific (+14% Recall@20),
# on amazon-beauty it lost 10% while three quarters of it gained 6% (docs/training.md).
REFIT_SHARES = (0.25, 0.5, 0.75, 1.0)


def target_logits(teacher: Teacher, histories: list[list[int]], temperature: float, distill_weight: float
                  ) -> torch.Tensor:
    """[B, J] log of finetuning's target distribution on whole-history prompts, each row centred and scaled
    to unit standard deviation: a user's ranking is all the head needs, and unscaled rows weigh in the least
    squares by the spread of their teacher scores, which grows with the history's length; users weighed
    alike read out 9% better Recall@20 and 11% NDCG@100 on amazon-beauty (docs/training.md)."""
    logits = teacher.scores(histories).double() / (temperature * teacher.top1)
    for row, history in zip(logits, histories):
        unseen = torch.ones(len(row), dtype=torch.bool)
        unseen[history] = False
        # teacher mass w x softmax over the unseen items; each of the n prompt items 1/n of the rest (1)
        row[history] = torch.logsumexp(row[unseen], 0) - math.log(distill_weight * len(history))
    centred = logits - logits.mean(1, keepdim=True)
    return centred / centred.std(1, keepdim=True).clamp(min=1e-12)


@torch.no_grad()
def head_features(model: CLLM4Rec, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, hidden (+ readout width)] what the head dots with the item vectors: logit_scale x (head_projection
    @ last hidden state), then the readout states with a readout; the backbone computing as scoring does."""
    with inference_autocast(model):
        last, readout_states = model.prompt_states(input_ids, attention_mask)
    features = model.logit_scale.float() * (last.float() @ model.head_projection.float().T)
    return features if readout_states is None else torch.cat([features, readout_states.float()], 1)


def refitted_parameters(model: CLLM4Rec) -> tuple[torch.Tensor, ...]:
    """The head's parameters the refit writes: offsets, bias and readout."""
    return model.head_offsets, model.item_bias, model.head_readout


@torch.no_grad()
def mix_heads(model: CLLM4Rec, trained: tuple[torch.Tensor, ...], refitted: tuple[torch.Tensor, ...],
              share: float) -> None:
    """The refitted parameters at (1 - share) x trained + share x refitted, each given as refitted_parameters
    lists them: the logits are mixed the same way, since they are linear in all of them."""
    for parameter, old, new in zip(refitted_parameters(model), trained, refitted):
        parameter.copy_(torch.lerp(old, new, share))


@dataclass
class NormalEquations:
    """The readout's least-squares system, summed over batches of training users."""

    gram: torch.Tensor  # [features + 1, features + 1], the last feature a constant (the bias)
    moments: torch.Tensor  # [features + 1, items]

    @classmethod
    def empty(cls, model: CLLM4Rec) -> NormalEquations:
        width = model.hidden_size + model.head_readout.shape[1] + 1
        device = model.collab_items.weight.device
        return cls(torch.zeros(width, width, dtype=torch.float64, device=device),
                   torch.zeros(width, model.n_items, dtype=torch.float64, device=device))

    @torch.no_grad()
    def add(self, model: CLLM4Rec, space: TokenSpace, split: Split, users: list[int], teacher: Teacher,
            temperature: float, distill_weight: float, max_history: int) -> None:
        """Add these training users' whole-history prompts (the model in eval mode)."""
        device = self.gram.device
        histories = [split.train[u].tolist() for u in users]
        ids, mask = pad([build_recommend_prompt(space, u, h, max_history) for u, h in zip(users, histories)])
        features = head_features(model, ids.to(device), mask.to(device)).double()
        features = torch.cat([features, features.new_ones(len(users), 1)], 1)
        self.gram += features.T @ features
        self.moments += features.T @ target_logits(teacher, histories, temperature, distill_weight).to(device)


@contextlib.contextmanager
def evaluating(model: CLLM4Rec) -> Iterator[None]:
    """The model in eval mode meanwhile, as it was afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def refit_users(split: Split) -> list[int]:
    """The users the refit reads: every training user with a history."""
    return [u for u, items in enumerate(split.train) if len(items)]


@torch.no_grad()
def refit_head(model: CLLM4Rec, space: TokenSpace, split: Split, teacher: Teacher, temperature: float,
               distill_weight: float, max_history: int, batch_size: int) -> None:
    """Set the head's offsets, bias (and readout) to the closed-form readout. The model must have head offsets."""
    if not model.has_head_offsets:
        raise ValueError("refitting the head needs a head with offsets (--head-offsets)")
    users = refit_users(split)
    system = NormalEquations.empty(model)
    with evaluating(model):
        for start in range(0, len(users), batch_size):
            system.add(model, space, split, users[start : start + batch_size], teacher, temperature, distill_weight,
                       max_history)
    gram = system.gram
    block_scale = gram.diagonal()[:-1].reshape(-1, model.hidden_size).mean(1)
    gram[:-1, :-1].diagonal().add_(RELATIVE_RIDGE * block_scale.repeat_interleave(model.hidden_size))
    readout = torch.linalg.solve(gram, system.moments)  # [features + 1, items]
    items = model.collab_items.weight
    model.head_offsets.copy_(readout[: model.hidden_size].T.to(items.dtype) - items)
    model.head_readout.copy_(readout[model.hidden_size : -1].T.to(items.dtype))  # 0 wide without a readout
    model.item_bias.copy_(readout[-1].to(items.dtype))


@torch.no_grad()
def estimate_refit_seconds(model: CLLM4Rec, space: TokenSpace, split: Split, teacher: Teacher, temperature: float,
                           distill_weight: float, max_history: int, batch_size: int) -> float:
    """How long refit_head will take, from one timed batch of it times the number of batches: the forward
    pass, the teacher's targets and the float64 products over the catalogue all grow with the data, the
    readout's width and the machine, which no fixed estimate follows. The batch timed is the second: the
    first pays for allocating the system and the first calls, which multiplied by the number of batches
    overstated amazon-beauty's refit by at least 1.6x."""
    users = refit_users(split)
    system = NormalEquations.empty(model)
    seconds = 0.0
    with evaluating(model):
        for start in (0, batch_size) if len(users) > batch_size else (0,):
            started = time.perf_counter()
            system.add(model, space, split, users[start : start + batch_size], teacher, temperature,
                       distill_weight, max_history)
            seconds = time.perf_counter() - started
    return seconds * math.ceil(len(users) / batch_size)
