"""`cllm4rec train` and `cllm4rec evaluate` (the offline side of the one `cllm4rec` command)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from model import distributed
from model.checkpoint import load_recommender, read_checkpoint
from model.data import DataError, load_dataset
from model.evaluate import (EASE_LAMBDA_USERS, EASE_LAMBDAS, ease_scorer, evaluate_cllm4rec, evaluate_scorer,
                            evaluation_users, metric_names, most_popular_scorer, pick_ease_lambda, sample_users)
from model.config import TrainConfig, resolve_device
from model.onnx_backbone import ENGINES, use_engine
from model.recipes import RECIPES, recipe_options
from model.train import train

# Options whose flag is not simply the field name with dashes, or that need help text.
INFERENCE_ENGINE_HELP = ("what runs the frozen backbone's passes without gradients (validation, the refit, "
                         "evaluation): auto (ONNX Runtime on a CPU, for a backbone without adapters; 1.85x "
                         "faster evaluation there, the same metrics), pytorch, onnxruntime")
HELP = {
    "backbone": "Hugging Face causal LM name or local directory; default: the bundled SmolLM2-135M-Instruct",
    "backbone_layers": "keep only the first N transformer layers (CPU budgets; fewer layers, lower quality)",
    "content_epochs": "content-LM-only epochs before the alternating ones (paper: 10)",
    "pretrain_epochs": "alternating collaborative/content epochs (paper: 100)",
    "finetune_epochs": "recommendation finetuning epochs, with early stopping (paper: 150)",
    "lambda_v": "weight of the mutual regularization between the two embedding sets (paper: 1)",
    "mask_ratio": "share of a user's training items held out of the finetuning prompt (paper: 0.2)",
    "max_history": "most items in a recommendation prompt or collaborative document",
    "max_text_tokens": "most words of a review or item text in a content document",
    "finetune_targets": "masked: predict the held-out items (paper text); all: every training item (reference code)",
    "content": "train the content LM (reviews, item text); off: collaborative and recommendation stages only",
    "finetune_content": "keep training the content LM during finetuning (paper: yes)",
    "anonymous_prompt_ratio": "share of finetuning prompts without the user token, so unknown users can be served",
    "unmasked_prompt_ratio": "share of finetuning prompts holding the user's whole training history, as validation and "
                             "serving do: with --finetune-targets all and a teacher, they learn the teacher's "
                             "ranking of the items the user has not seen",
    "val_users": "validation users sampled for the per-epoch check (0: all)",
    "device": "auto (CUDA when available), cpu or cuda[:N]",
    "autocast": "compute the backbone in bfloat16: auto (on CUDA), off (float32), bf16 (also on the CPU: faster "
                "at full depth on CPUs with AVX-512 BF16 or AMX, about 10x slower on CPUs without them)",
    "inference_engine": INFERENCE_ENGINE_HELP,
    "resume": "continue the run in --out from its last completed epoch",
    "seed": "seed of the split and of training",
    "init_std": "standard deviation of the random initial token embeddings (paper: 0.02)",
    "init": "where soft tokens start: random N(0, init-std) (paper), text (title words), collaborative "
            "(SVD of the training matrix on the word embeddings' principal directions), text+collaborative",
    "init_rank": "rank of the collaborative factorisation (0: the backbone's width)",
    "head_bias": "train a per-item bias and a logit scale in the tied item head (not in the paper)",
    "head_adapter": "train a square projection (identity at the start) of the last hidden state before the tied "
                    "item head: a small adapter, not in the paper",
    "head_offsets": "per-item output offsets in the item head (zero at the start): an item's output vector may "
                    "move away from its input token (not in the paper)",
    "head_refit": "after finetuning, refit the head's offsets and bias in closed form (least squares from the "
                  "features the head reads on the served prompt to the logits of the teacher's target, over the "
                  "training users); kept when validation improves. Needs --head-offsets and a teacher",
    "head_readout": "the refitted head also reads the states at the prompt's end after every inner block and "
                    "the mean over its item positions of every layer's states, the soft tokens included (a "
                    "table per block of states, set by the refit alone; not in the paper). Needs --head-refit",
    "adapter_rank": "rank of low-rank adapters (LoRA) on every linear map of the backbone's last blocks, trained "
                    "with the collaborative view (0: none, the paper's frozen backbone)",
    "adapter_layers": "how many of the backbone's last transformer blocks get adapters",
    "adapter_targets": "which linear maps of those blocks get adapters: all (attention and MLP), or attention",
    "input_gradients": "backpropagate through the backbone into the prompt's soft tokens (paper); off: the tables "
                       "learn from the tied head alone and a step costs about one forward pass",
    "distill_weight": "weight of the cross-entropy towards a teacher (EASE, or low-rank for large catalogues) "
                      "fitted on the training part, relative to the multinomial likelihood (0: off)",
    "distill_temperature": "teacher softmax temperature, in units of its mean best score over training users",
    "distill_lambda": "the teacher's regularisation (EASE's lambda; 0: the best of "
                      f"{', '.join(f'{lam:g}' for lam in EASE_LAMBDAS)} on validation, as evaluate picks EASE's)",
    "teacher_text": "the teacher's item-item Gram matrix adds the items' text similarity (tf-idf of title, "
                    "description and the reviews of training pairs; Jeunen et al., RecSys 2020)",
    "teacher_text_weight": "weight of the text similarity, in units of the mean item count (0: the best of "
                           "0.1, 0.3, 1 and none on validation)",
    "teacher_max_items": "EASE teacher up to this many items (a dense items x items matrix), low-rank beyond",
    "teacher_rank": "rank of the low-rank teacher",
    "lr_schedule": "finetuning learning rate: constant, or cosine decay (over the epochs or the time budget)",
    "warmup_steps": "finetuning steps of linear learning-rate warm-up",
    "lr_floor": "where cosine decay ends, as a fraction of --finetune-lr",
    "weight_decay": "decoupled weight decay of the collaborative user/item rows a step trains",
    "time_budget": "minutes of training (data loading included), then a clean stop keeping the best checkpoint "
                   "(0: no budget)",
    "patience": "finetuning epochs without improvement before stopping (0: no early stopping)",
    "recipe": "a named set of options (explicit options override it): "
              + "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in options.items())
                          for name, options in RECIPES.items()),
}


def add_train_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a CLLM4Rec checkpoint from a dataset directory",
                              description="Options not given take the recipe's value, else the default shown.")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.name in ("data", "out"):
            p.add_argument(flag, required=True, help="dataset directory" if field.name == "data" else
                           "checkpoint directory to write")
            continue
        # No argparse default: an option left out must not override the recipe (SUPPRESS keeps it unset).
        shown = HELP.get(field.name, "")
        by_recipe = [f"{name}: {options[field.name]}" for name, options in RECIPES.items() if field.name in options]
        shown += f" (default: {field.default}" + (f"; {', '.join(by_recipe)}" if by_recipe else "") + ")"
        if field.name == "recipe":
            p.add_argument(flag, choices=["none", *RECIPES], default=argparse.SUPPRESS, help=shown)
        elif field.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=shown)
        else:
            kind = {"int": int, "float": float, "str": str, "int | None": int}[field.type]
            p.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=shown)
    p.set_defaults(func=run_train)


def train_config(args) -> TrainConfig:
    """Defaults, then the recipe's options, then the options given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    recipe = given.get("recipe", "none")
    return TrainConfig(**{**recipe_options(recipe), **given})


def run_train(args) -> int:
    config = train_config(args)
    try:
        best = train(config)
    except KeyboardInterrupt:
        distributed.leave(130)
        return 130
    if best:
        print(f"best epoch {best['epoch']} ({best['stage']}): " +
              " ".join(f"{k}={v:.4f}" for k, v in best["val"].items()) + f"; checkpoint in {config.out}")
    distributed.leave(0)
    return 0


def add_evaluate_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="Recall@20/40 and NDCG@100 of a checkpoint next to most-popular and EASE",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory written by cllm4rec train")
    p.add_argument("--data", required=True, help="the dataset directory the checkpoint was trained on")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--ease-lambda", type=float, default=None,
                   help=f"EASE regularisation; default: the best of {list(EASE_LAMBDAS)} on {EASE_LAMBDA_USERS} "
                        "validation users")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--inference-engine", choices=ENGINES, default="auto", help=INFERENCE_ENGINE_HELP)
    p.set_defaults(func=run_evaluate)


def run_evaluate(args) -> int:
    checkpoint = read_checkpoint(args.checkpoint)
    dataset = load_dataset(args.data)
    if dataset.fingerprint() != checkpoint.meta.get("data_fingerprint"):
        raise DataError(f"{args.data} is not the data {args.checkpoint} was trained on (its interactions differ); "
                         "evaluation needs the same data to use the stored split")
    split = checkpoint.split
    n_items = checkpoint.meta["n_items"]
    users = evaluation_users(split, args.split)
    if not users:
        raise DataError(f"no user has {args.split} items (users need at least 3 interactions)")
    device = resolve_device(args.device)
    started = time.perf_counter()
    recommender = load_recommender(args.checkpoint, device, torch.float32)
    note = use_engine(recommender.model, args.inference_engine, recommender.device)
    if note:
        print(note, file=sys.stderr)
    results = {"cllm4rec": evaluate_cllm4rec(recommender.model, recommender.space, split, args.split, users,
                                             recommender.max_history, args.batch_size)}
    seconds = time.perf_counter() - started
    results["most_popular"] = evaluate_scorer(most_popular_scorer(split, n_items), split, args.split, users,
                                              args.batch_size)
    lam = args.ease_lambda or pick_ease_lambda(
        split, n_items, sample_users(evaluation_users(split, "val"), EASE_LAMBDA_USERS, seed=0), args.batch_size)
    results["ease"] = evaluate_scorer(ease_scorer(split, args.split, n_items, lam), split, args.split, users,
                                      args.batch_size)
    results["users"] = len(users)
    results["split"] = args.split
    results["ease_lambda"] = lam
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.split} split, {len(users)} users, all {n_items} items ranked, known items excluded "
          f"(CLLM4Rec scored in {seconds:.0f} s on {device})")
    names = metric_names()
    print(f"{'model':<16}" + "".join(f"{n:>12}" for n in names))
    for model, label in (("cllm4rec", "cllm4rec"), ("most_popular", "most-popular"), ("ease", f"ease (λ={lam:g})")):
        print(f"{label:<16}" + "".join(f"{results[model][n]:>12.4f}" for n in names))
    return 0


def add_parsers(subparsers) -> None:
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)


def report_error(e: Exception) -> int:
    print(f"cllm4rec: error: {e}", file=sys.stderr)
    return 2
