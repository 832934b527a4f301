"""The item head refitted in closed form: the best linear readout of the trained model's features towards the teacher.

After finetuning, the head's output vectors are what gradient steps on masked prompts made of them. A
least-squares readout, from the features the head reads on the served prompt to the logits of
finetuning's target, fits them exactly in one forward pass over the training users:

    f_u   logit_scale * (head_projection @ h_u), h_u the last hidden state of user u's prompt with the
          whole training history (the prompt that validation and serving use)
    s_u   the logits of finetuning's target distribution for that prompt, minus their mean (a softmax
          ignores a user's constant): the teacher's logits (its scores at the distillation temperature)
          for the items not in the prompt, which hold distill_weight / (1 + distill_weight) of the
          target, and for the prompt's own items (the multinomial targets, the rest, equally shared)
          the logit that gives them that share
    [W; b] = argmin sum_u ||W f_u + b - s_u||^2 + ridge ||W||^2        (W: items x hidden, b: items)

and logit_j = f . (e_j + offset_j) + b_j, so the refit sets offset_j = W_j - e_j and bias_j = b_j: the
tied item embeddings e_j stay the prompt's input tokens, the offsets untie the head's side
(--head-offsets). Training users only, scored by a teacher fitted on the training part: no validation
or test item reaches it. Measured in docs/training.md ("The head refitted in closed form").
"""

from __future__ import annotations

import math

import torch

from model.cllm4rec import COLLAB, CLLM4Rec, inference_autocast, pad
from model.data import Split
from model.prompts import TokenSpace, build_recommend_prompt
from model.teachers import Teacher

# Ridge of the readout, relative to the mean diagonal of the features' Gram matrix: users far outnumber
# the hidden width, so it only guards the solve; the readout's validation figures were flat from about
# 4e-9 to 4e-6 of that scale on amazon-scientific.
RELATIVE_RIDGE = 1e-6
# How much of the refit the head takes, (1 - share) x the trained head + share x the refit, each
# validated (the trained head is share 0): the whole refit was best on amazon-scientific (+14% Recall@20),
# on amazon-beauty it lost 10% while three quarters of it gained 6% (docs/training.md).
REFIT_SHARES = (0.25, 0.5, 0.75, 1.0)


def target_logits(teacher: Teacher, histories: list[list[int]], temperature: float, distill_weight: float
                  ) -> torch.Tensor:
    """[B, J] log of finetuning's target distribution on whole-history prompts, centred per row."""
    logits = teacher.scores(histories).double() / (temperature * teacher.top1)
    for row, history in zip(logits, histories):
        unseen = torch.ones(len(row), dtype=torch.bool)
        unseen[history] = False
        # teacher mass w x softmax over the unseen items; each of the n prompt items 1/n of the rest (1)
        row[history] = torch.logsumexp(row[unseen], 0) - math.log(distill_weight * len(history))
    return logits - logits.mean(1, keepdim=True)


@torch.no_grad()
def head_features(model: CLLM4Rec, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, hidden] what the head dots with the item vectors: logit_scale * (head_projection @ last hidden state),
    the backbone computing as scoring does (bf16 on CUDA)."""
    with inference_autocast(model):
        hidden = model.hidden_states(input_ids, attention_mask, COLLAB)
    last = hidden[torch.arange(len(input_ids), device=input_ids.device), attention_mask.sum(1) - 1]
    return model.logit_scale.float() * (last.float() @ model.head_projection.float().T)


@torch.no_grad()
def mix_heads(model: CLLM4Rec, trained: tuple[torch.Tensor, torch.Tensor], refitted: tuple[torch.Tensor, torch.Tensor],
              share: float) -> None:
    """Offsets and bias at (1 - share) x trained + share x refitted, each an (offsets, bias) pair: the
    logits are mixed the same way, since they are linear in both."""
    model.head_offsets.copy_(torch.lerp(trained[0], refitted[0], share))
    model.item_bias.copy_(torch.lerp(trained[1], refitted[1], share))


@torch.no_grad()
def refit_head(model: CLLM4Rec, space: TokenSpace, split: Split, teacher: Teacher, temperature: float,
               distill_weight: float, max_history: int, batch_size: int) -> None:
    """Set the head's offsets and bias to the closed-form readout. The model must have head offsets."""
    if not model.has_head_offsets:
        raise ValueError("refitting the head needs a head with offsets (--head-offsets)")
    device = model.collab_items.weight.device
    users = [u for u, items in enumerate(split.train) if len(items)]
    width = model.hidden_size + 1  # the features and a constant (the bias)
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    moments = torch.zeros(width, model.n_items, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        histories = [split.train[u].tolist() for u in batch]
        ids, mask = pad([build_recommend_prompt(space, u, h, max_history) for u, h in zip(batch, histories)])
        features = head_features(model, ids.to(device), mask.to(device)).double()
        features = torch.cat([features, features.new_ones(len(batch), 1)], 1)
        gram += features.T @ features
        moments += features.T @ target_logits(teacher, histories, temperature, distill_weight).to(device)
    model.train(was_training)
    gram[:-1, :-1].diagonal().add_(RELATIVE_RIDGE * float(gram.diagonal()[:-1].mean()))
    readout = torch.linalg.solve(gram, moments)  # [hidden + 1, items]
    items = model.collab_items.weight
    model.head_offsets.copy_(readout[:-1].T.to(items.dtype) - items)
    model.item_bias.copy_(readout[-1].to(items.dtype))
