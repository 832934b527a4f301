"""Named recipes: a set of training options chosen together, one command each.

    cllm4rec train --data D --out O --recipe cpu     (options given as well override the recipe)

RECIPES lists what each sets; every other option keeps its default (model/config.py). Why each value:
docs/training.md, with the validation ablations that chose it.
"""

from __future__ import annotations

RECIPES: dict[str, dict[str, object]] = {
    # The paper's schedule and choices (Zhu et al., WWW 2024, and the authors' code): full backbone,
    # content LM, 10 content + 100 alternating + 150 finetuning epochs, Adam 1e-3 / 1e-4, batch 20,
    # lambda_V 1, N(0, 0.02) tokens, the plain tied head, no teacher. A GPU job.
    "paper": {
        "backbone_layers": None,
        "content": True,
        "content_epochs": 10,
        "pretrain_epochs": 100,
        "finetune_epochs": 150,
        "pretrain_lr": 1e-3,
        "finetune_lr": 1e-4,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "batch_size": 20,
        "lambda_v": 1.0,
        "mask_ratio": 0.2,
        "init": "random",
        "head_bias": False,
        "head_adapter": False,
        "distill_weight": 0.0,
        "time_budget": 0.0,
    },
    # An hour of a 2-core CPU: the levers that measured best on validation (docs/training.md).
    "cpu": {
        "backbone_layers": 4,
        "content": False,
        "content_epochs": 0,
        "pretrain_epochs": 0,
        "finetune_epochs": 200,
        "finetune_lr": 1e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 100,
        "batch_size": 32,
        "init": "text+collaborative",
        "head_bias": True,
        "head_adapter": True,
        "head_offsets": True,
        "head_refit": True,
        "head_readout": True,
        "distill_weight": 1.0,
        "distill_temperature": 0.125,
        "time_budget": 55.0,
        "patience": 10,
    },
}
# A GPU: the cpu recipe's levers at full depth, batch 512 (a step of the backbone on a GPU is bound
# by kernel launches, so a larger batch is nearly free), half an hour.
# The readout stays off there: at 30 layers it would be 60 blocks of states (1.7 GB of float32 per 12k items,
# a 35k-wide float64 solve), not measured on a GPU. Without it the gradient-trained head matters more,
# and it trained worse from the collaborative start (docs/training.md): the tokens start from their text.
RECIPES["gpu"] = {**RECIPES["cpu"], "backbone_layers": None, "batch_size": 512, "time_budget": 30.0,
                  "head_readout": False, "init": "text"}


def recipe_options(name: str) -> dict[str, object]:
    """The options a recipe sets ("none": none)."""
    if name == "none":
        return {}
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; one of {', '.join(['none', *RECIPES])}")
    return dict(RECIPES[name])
