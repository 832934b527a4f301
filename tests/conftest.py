"""Shared fixtures: tiny randomly initialised backbones (GPT-2 and Llama families) saved as real
Hugging Face directories, so tests go through the same loading code as users, in seconds on a CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Words of the synthetic datasets and the prompt templates, so the tiny tokenizer splits them sensibly.
CORPUS = [
    "has interacted with will interact with writes the following review for is described as a user the user",
    "I use this for coffee running garden camera baking yoga guitar hiking works great good value",
    "exactly as described solid quality would buy again a bit pricey classic compact premium organic",
    "lightweight durable deluxe everyday espresso beans pour-over kettle milk frother burr grinder",
    "trail shoes sports watch tripod memory card bread flour yoga mat guitar strings headlamp day pack",
]


def make_tiny_backbone(directory: Path, family: str = "llama", n_layers: int = 2, hidden: int = 32) -> Path:
    """Write a random tiny causal LM with a small trained BPE tokenizer into directory.

    initializer_range is 10x the usual: a tiny random LM with standard init outputs near-uniform
    word distributions, which the content LM could not move."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import GPT2Config, LlamaConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    import torch

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    vocab = tok.get_vocab_size()
    if family == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=hidden, n_layer=n_layers, n_head=4,
                            bos_token_id=1, eos_token_id=1, initializer_range=0.2)
    else:
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=1,
                             initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def make_backbone(tmp_path_factory):
    """make_backbone(family, n_layers=..., hidden=...) -> a directory with a new tiny backbone."""
    return lambda family="llama", **kw: make_tiny_backbone(tmp_path_factory.mktemp(f"tiny-{family}"), family, **kw)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_backbone(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    from model.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_users=120, n_items=48, n_categories=4,
                                   min_items=5, max_items=10, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_llama, synthetic_data) -> Path:
    """A trained tiny checkpoint (a few seconds of training): for checkpoint, evaluation and server tests."""
    from model.config import TrainConfig
    from model.train import train

    out = tmp_path_factory.mktemp("checkpoint") / "ckpt"
    train(TrainConfig(data=str(synthetic_data), out=str(out), backbone=str(tiny_llama), content_epochs=1,
                      pretrain_epochs=1, finetune_epochs=2, batch_size=16, max_text_tokens=16, val_users=0,
                      pretrain_lr=1e-2, finetune_lr=1e-2))
    return out
