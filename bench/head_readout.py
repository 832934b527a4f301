"""The closed-form head on an untrained model: how much of the teacher a linear readout of the frozen
backbone reaches before any gradient step, by depth.

    python bench/head_readout.py --data ../shared/data/amazon-scientific --layers 2 4 8 [--readout]

For each depth: SmolLM2 cut to that many layers, soft tokens from their text (--init text), the teacher
the trainer would fit (EASE with item text, the given text weight), the head refitted in closed form
towards it (model/head_readout.py; with --readout it also reads the readout states, --head-readout),
and validation Recall@20 / Recall@40 / NDCG@100 on the trainer's
fixed sample of validation users, with the seconds the refit took. One JSON line per depth.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from model.backbone import DEFAULT_BACKBONE, load_backbone
from model.cllm4rec import CLLM4Rec
from model.data import load_dataset, split_dataset
from model.evaluate import evaluate_cllm4rec, evaluation_users, sample_users
from model.head_readout import refit_head
from model.initialise import INITIALISERS, initialise
from model.onnx_backbone import ENGINES, use_engine
from model.prompts import PromptTemplates, TokenSpace
from model.teachers import fit_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[4])
    parser.add_argument("--val-users", type=int, default=1000)
    parser.add_argument("--text-weight", type=float, default=1.0, help="the teacher's text weight (0: plain EASE)")
    parser.add_argument("--temperature", type=float, default=0.125)
    parser.add_argument("--distill-weight", type=float, default=1.0)
    parser.add_argument("--readout", action="store_true", help="the head also reads the readout states (--head-readout)")
    parser.add_argument("--init", default="text", choices=INITIALISERS, help="where the soft tokens start (--init)")
    parser.add_argument("--inference-engine", default="pytorch", choices=ENGINES,
                        help="what runs the refit's and validation's forward passes (--inference-engine)")
    args = parser.parse_args()
    dataset = load_dataset(args.data)
    split = split_dataset(dataset, 0)
    val = sample_users(evaluation_users(split, "val"), args.val_users, 0)
    texts = dataset.item_texts
    teacher = fit_teacher(split, dataset.n_items, 500.0, 20000, 512, val, texts, args.text_weight, 0)
    for layers in args.layers:
        backbone, tokenizer = load_backbone(DEFAULT_BACKBONE, layers)
        torch.manual_seed(0)
        model = CLLM4Rec(backbone, dataset.n_users, dataset.n_items, head_offsets=True, head_readout=args.readout)
        space = TokenSpace(tokenizer, model.n_words, dataset.n_users, dataset.n_items, PromptTemplates())
        initialise(model, args.init, tokenizer, dataset, split, model.hidden_size)
        use_engine(model, args.inference_engine, torch.device("cpu"))
        started = time.monotonic()
        refit_head(model, space, split, teacher, args.temperature, args.distill_weight, 50, 64)
        seconds = time.monotonic() - started
        metrics = evaluate_cllm4rec(model, space, split, "val", val, 50, 64)
        print(json.dumps({"layers": layers, "init": args.init, "readout": args.readout,
                          "refit_seconds": round(seconds, 1), "threads": torch.get_num_threads(),
                          "inference_engine": args.inference_engine,
                          **{k: round(v, 4) for k, v in metrics.items()}}), flush=True)


if __name__ == "__main__":
    main()
