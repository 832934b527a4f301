"""On a CUDA machine: training under bf16 autocast learns, and its checkpoint ranks alike on the GPU
(bfloat16 compute, float16 weights) and on the CPU (float32). Skipped without a CUDA device (CI)."""

import pytest
import torch

from model.checkpoint import load_recommender
from model.cllm4rec import score_prompts
from model.evaluate import evaluate_cllm4rec, evaluate_scorer, evaluation_users, most_popular_scorer
from model.prompts import build_recommend_prompt
from model.synthetic import write_synthetic_dataset
from model.config import TrainConfig
from model.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_training_on_cuda_learns_and_its_checkpoint_ranks_alike_on_gpu_and_cpu(tiny_llama, tmp_path):
    data = write_synthetic_dataset(tmp_path / "data", n_users=200, n_items=120, n_categories=8, min_items=6,
                                   max_items=12, seed=2)
    out = tmp_path / "ckpt"
    train(TrainConfig(data=str(data), out=str(out), backbone=str(tiny_llama), device="cuda", content_epochs=1,
                      pretrain_epochs=1, finetune_epochs=12, batch_size=16, max_text_tokens=16, val_users=0,
                      pretrain_lr=1e-2, finetune_lr=1e-2))
    on_gpu, on_cpu = load_recommender(out, "cuda"), load_recommender(out, "cpu")
    in_float16 = load_recommender(out, "cuda", torch.float16)
    split = on_cpu.checkpoint.split
    users = evaluation_users(split, "test")
    ours = evaluate_cllm4rec(on_gpu.model, on_gpu.space, split, "test", users, on_gpu.max_history, 64)
    popular = evaluate_scorer(most_popular_scorer(split, 120), split, "test", users, 64)
    assert ours["recall@20"] > popular["recall@20"] + 0.1, (ours, popular)

    prompts = [build_recommend_prompt(on_cpu.space, u, split.train[u].tolist(), on_cpu.max_history) for u in users]
    cpu_top = score_prompts(on_cpu.model, prompts).topk(10).indices
    for recommender in (on_gpu, in_float16):
        scores = score_prompts(recommender.model, prompts).cpu()
        assert torch.isfinite(scores).all()
        top = scores.topk(10).indices
        overlap = sum(len(set(g.tolist()) & set(c.tolist())) for g, c in zip(top, cpu_top)) / top.numel()
        assert overlap > 0.9, overlap
