"""The trainer's settings: every option of `cllm4rec train`, its default and its checks.

Named recipes (model/recipes.py) set several of these at once; options given on the command line
override a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.adapters import ADAPTER_TARGETS
from model.backbone import DEFAULT_BACKBONE
from model.initialise import INITIALISERS
from model.onnx_backbone import ENGINES
from model.precision import AUTOCAST_MODES

LR_SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """The run's settings cannot work (bad option, --resume of a different run, missing device)."""


@dataclass
class TrainConfig:
    data: str
    out: str
    recipe: str = "none"  # the recipe these settings came from (recorded in the checkpoint)
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
    lr_schedule: str = "constant"  # finetuning: constant, or cosine decay to lr_floor x lr after warm-up
    warmup_steps: int = 0  # finetuning steps of linear warm-up
    lr_floor: float = 0.1  # where cosine decay ends, as a fraction of the finetuning lr
    weight_decay: float = 0.0  # decoupled weight decay of the collaborative tables' rows in a step
    batch_size: int = 20
    lambda_v: float = 1.0
    mask_ratio: float = 0.2
    max_history: int = 50  # items in a recommendation prompt / collaborative document
    max_text_tokens: int = 128  # words of a review or item text in a content document
    finetune_targets: str = "all"  # "all": every training item (reference code); "masked": the held-out items (paper text)
    content: bool = True  # train the content LM at all (text still initialises tokens, see init)
    finetune_content: bool = True  # keep training the content LM during finetuning (paper)
    anonymous_prompt_ratio: float = 0.1  # finetuning examples without the user token (cold-start prompt)
    unmasked_prompt_ratio: float = 0.0  # finetuning prompts with the whole training history (the served prompt)
    init: str = "text"  # where soft tokens start (model/initialise.py)
    init_std: float = 0.02  # N(0, init_std) for init random (paper)
    init_rank: int = 0  # rank of the collaborative factorisation (0: the backbone's width)
    head_bias: bool = False  # train a per-item bias and a logit scale in the item head (not in the paper)
    input_gradients: bool = True  # backpropagate through the backbone into the prompt's soft tokens (paper)
    head_adapter: bool = False  # train a square projection of the last hidden state before the head (not in the paper)
    head_offsets: bool = False  # per-item output offsets in the head, trained with it (not in the paper)
    head_refit: bool = False  # after finetuning, the head refitted in closed form (model/head_readout.py)
    head_readout: bool = False  # the refit also reads every layer's states (model/cllm4rec.py; not in the paper)
    adapter_rank: int = 0  # low-rank adapters on the backbone's last blocks (0: none, the paper's frozen backbone)
    adapter_layers: int = 4  # how many of the last transformer blocks get adapters
    adapter_targets: str = "all"  # which linear maps of those blocks: all, or attention
    distill_weight: float = 0.0  # weight of the teacher's cross-entropy next to the multinomial likelihood (0: off)
    distill_temperature: float = 0.125  # teacher softmax temperature, in units of its mean best score
    # The teacher's regularisation (0: the best of evaluate.EASE_LAMBDAS on validation, as evaluate picks EASE's):
    # a fixed 500 held the student 2% below EASE on a catalogue of 85 items, where EASE's best is 50.
    distill_lambda: float = 0.0
    teacher_text: bool = True  # the teacher's Gram matrix includes the items' text similarity (titles, descriptions
    # and training reviews, when there are any)
    teacher_text_weight: float = 0.0  # weight of the text similarity (0: the best of teachers.TEXT_WEIGHTS on validation)
    teacher_max_items: int = 20000  # EASE teacher up to this many items, low-rank beyond
    teacher_rank: int = 512  # rank of the low-rank teacher
    time_budget: float = 0.0  # minutes of training, then stop cleanly with the best checkpoint (0: none)
    patience: int = 10  # finetuning epochs without improvement before stopping (0: never stop early)
    val_users: int = 2000  # validation users sampled once per run (0: all)
    eval_batch_size: int = 64
    device: str = "auto"
    autocast: str = "auto"  # bf16 compute of the backbone: auto (CUDA), off, bf16 (also on the CPU)
    inference_engine: str = "auto"  # what runs passes without gradients: auto (ONNX Runtime on a CPU), pytorch, ...
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
            (0 <= self.unmasked_prompt_ratio <= 1, "--unmasked-prompt-ratio must be in [0, 1]"),
            (self.backbone_layers is None or self.backbone_layers >= 1, "--backbone-layers must be at least 1"),
            (self.pretrain_lr > 0 and self.finetune_lr > 0, "learning rates must be positive"),
            (self.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.warmup_steps >= 0, "--warmup-steps must not be negative"),
            (0 <= self.lr_floor <= 1, "--lr-floor must be in [0, 1]"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (self.init in INITIALISERS, f"--init must be one of {', '.join(INITIALISERS)}"),
            (self.init_rank >= 0, "--init-rank must not be negative"),
            (self.adapter_rank >= 0 and self.adapter_layers >= 1,
             "--adapter-rank must not be negative and --adapter-layers must be at least 1"),
            (self.adapter_targets in ADAPTER_TARGETS, f"--adapter-targets must be one of {', '.join(ADAPTER_TARGETS)}"),
            (not self.head_refit or (self.head_offsets and self.distill_weight > 0),
             "--head-refit needs --head-offsets and a teacher (--distill-weight above 0)"),
            (not self.head_readout or self.head_refit, "--head-readout needs --head-refit (the refit sets it)"),
            (self.distill_weight >= 0, "--distill-weight must not be negative"),
            (self.distill_temperature > 0, "--distill-temperature must be positive"),
            (self.distill_lambda >= 0, "--distill-lambda must not be negative (0: chosen on validation)"),
            (self.teacher_text_weight >= 0, "--teacher-text-weight must not be negative"),
            (self.teacher_max_items >= 0 and self.teacher_rank >= 1, "--teacher-max-items must not be negative "
                                                                      "and --teacher-rank must be at least 1"),
            (self.time_budget >= 0, "--time-budget must not be negative"),
            (self.patience >= 0, "--patience must not be negative (0: no early stopping)"),
            (self.val_users >= 0, "--val-users must not be negative (0: all validation users)"),
            (self.autocast in AUTOCAST_MODES, f"--autocast must be one of {', '.join(AUTOCAST_MODES)}"),
            (self.inference_engine in ENGINES, f"--inference-engine must be one of {', '.join(ENGINES)}"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available")
    return torch.device(name)
