"""Helpers of the trainer tests (a module of its own name, not conftest: test modules import it)."""

from __future__ import annotations

from model.config import TrainConfig


def quick_config(data, out, backbone, **overrides) -> TrainConfig:
    """A run of seconds on a tiny backbone: one pretraining and three finetuning epochs, large lrs."""
    config = dict(data=str(data), out=str(out), backbone=str(backbone), content_epochs=0, pretrain_epochs=1,
                  finetune_epochs=3, batch_size=16, max_text_tokens=16, val_users=0, pretrain_lr=1e-2,
                  finetune_lr=1e-2, finetune_content=False, finetune_targets="all")
    config.update(overrides)
    return TrainConfig(**config)
