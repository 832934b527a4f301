"""The trainer end to end on data with a planted structure: it learns, keeps the best epoch, resumes."""

import json

import pytest
import torch

from model import train as train_module
from model.checkpoint import METRICS_FILE, load_recommender, read_checkpoint
from model.evaluate import evaluate_cllm4rec, evaluate_scorer, evaluation_users, most_popular_scorer
from model.synthetic import write_synthetic_dataset
from model.config import ConfigError
from model.train import train
from service.cli import main as cli
from training_helpers import quick_config


@pytest.fixture(scope="module")
def planted_data(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("planted"), n_users=200, n_items=120, n_categories=8,
                                   min_items=6, max_items=12, seed=2, reviews=False)


def test_finetuned_model_beats_most_popular_on_planted_tastes(planted_data, tiny_llama, tmp_path):
    out = tmp_path / "ckpt"
    train(quick_config(planted_data, out, tiny_llama, finetune_epochs=12))
    recommender = load_recommender(out, "cpu")
    split = recommender.checkpoint.split
    users = evaluation_users(split, "test")
    ours = evaluate_cllm4rec(recommender.model, recommender.space, split, "test", users, recommender.max_history, 64)
    popular = evaluate_scorer(most_popular_scorer(split, 120), split, "test", users, 64)
    assert ours["recall@20"] > popular["recall@20"] + 0.1, (ours, popular)


def test_metrics_file_has_every_epoch_and_the_checkpoint_is_the_best(planted_data, tiny_llama, tmp_path):
    out = tmp_path / "ckpt"
    best = train(quick_config(planted_data, out, tiny_llama))
    records = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert [r["stage"] for r in records] == ["pretrain", "finetune", "finetune", "finetune"]
    best_record = max(records, key=lambda r: r["score"])
    assert best["epoch"] == best_record["epoch"]
    assert read_checkpoint(out).meta["metrics"]["val"] == best_record["val"]
    assert all(r["passes"][name]["tokens_per_s"] > 0 for r in records for name in r["passes"])


def test_interrupted_run_resumes_to_the_same_result(planted_data, tiny_llama, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    train(quick_config(planted_data, reference, tiny_llama))

    interrupted = tmp_path / "interrupted"
    original = train_module.Trainer.run_epoch

    def stop_in_third_epoch(self, stage):
        if self.epoch == 2:
            raise KeyboardInterrupt
        return original(self, stage)

    monkeypatch.setattr(train_module.Trainer, "run_epoch", stop_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(quick_config(planted_data, interrupted, tiny_llama))
    read_checkpoint(interrupted)  # the last good checkpoint is whole
    monkeypatch.setattr(train_module.Trainer, "run_epoch", original)

    with pytest.raises(ConfigError, match="already holds a checkpoint"):
        train(quick_config(planted_data, interrupted, tiny_llama))
    train(quick_config(planted_data, interrupted, tiny_llama, resume=True))
    a, b = read_checkpoint(reference), read_checkpoint(interrupted)
    for name in a.embeddings:
        assert torch.allclose(a.embeddings[name], b.embeddings[name], atol=1e-6), name
    assert len((interrupted / METRICS_FILE).read_text().splitlines()) == 4


def test_resume_refuses_a_different_run(planted_data, tiny_llama, tiny_gpt2, tmp_path):
    out = tmp_path / "ckpt"
    train(quick_config(planted_data, out, tiny_llama, finetune_epochs=0))
    with pytest.raises(ConfigError, match="backbone"):
        train(quick_config(planted_data, out, tiny_gpt2, resume=True))


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    assert cli(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "no such dataset directory" in capsys.readouterr().err
    assert cli(["evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "interactions.csv").write_text("user_id,item_id\nu1,a\n")
    assert cli(["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--mask-ratio", "2"]) == 2
    assert "--mask-ratio must be in (0, 1)" in capsys.readouterr().err


def test_evaluate_json_compares_with_the_baselines(tiny_checkpoint, synthetic_data, capsys):
    assert cli(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for model in ("cllm4rec", "most_popular", "ease"):
        assert set(result[model]) == {"recall@20", "recall@40", "ndcg@100"}
        assert all(0 <= v <= 1 for v in result[model].values())
    assert result["users"] == 120


def test_evaluation_through_onnxruntime_gives_pytorchs_metrics(tiny_checkpoint, synthetic_data, capsys):
    """The engine of the frozen backbone's passes changes their speed, not the metrics (to float rounding)."""
    results = {}
    for engine in ("pytorch", "onnxruntime"):
        assert cli(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(synthetic_data), "--json",
                    "--inference-engine", engine]) == 0
        results[engine] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cllm4rec"]
    assert results["onnxruntime"] == pytest.approx(results["pytorch"], abs=1e-3)


def test_the_inference_engine_runs_only_a_backbone_that_does_not_train(tiny_llama):
    """auto: ONNX Runtime on a CPU for a frozen backbone; adapters train it, so they keep PyTorch's."""
    from model.backbone import load_backbone
    from model.cllm4rec import CLLM4Rec
    from model.onnx_backbone import use_engine

    cpu = torch.device("cpu")
    for adapters, engine, runs in ((0, "auto", True), (4, "auto", False), (0, "pytorch", False)):
        backbone, _ = load_backbone(str(tiny_llama))
        model = CLLM4Rec(backbone, 4, 6)
        if adapters:
            model.attach_adapters(adapters, 1)
        note = use_engine(model, engine, cpu)
        assert (model.inference_backbone is not None) == runs and (note is not None) == runs
    with pytest.raises(ValueError, match="inference engine must be one of"):
        use_engine(model, "tensorrt", cpu)


def test_evaluate_refuses_other_data(tiny_checkpoint, planted_data, capsys):
    assert cli(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(planted_data)]) == 2
    assert "is not the data" in capsys.readouterr().err


def test_early_stopping_ends_finetuning_without_improvement(planted_data, tiny_llama, tmp_path, capsys):
    out = tmp_path / "ckpt"
    train(quick_config(planted_data, out, tiny_llama, finetune_epochs=8, finetune_lr=1e-12, patience=2))
    stages = [json.loads(line)["stage"] for line in (out / METRICS_FILE).read_text().splitlines()]
    assert stages == ["pretrain", "finetune", "finetune"]
    assert "early stop: no improvement in 2 epochs" in capsys.readouterr().out


def test_text_init_starts_items_at_their_title_words(planted_data, tiny_llama):
    from model.backbone import load_backbone
    from model.cllm4rec import CLLM4Rec
    from model.data import load_dataset, split_dataset
    from model.initialise import initialise

    dataset = load_dataset(planted_data)
    split = split_dataset(dataset, seed=0)
    backbone, tokenizer = load_backbone(str(tiny_llama))
    model = CLLM4Rec(backbone, dataset.n_users, dataset.n_items)
    assert f"{dataset.n_items} of {dataset.n_items} items from their titles" in initialise(
        model, "text", tokenizer, dataset, split, rank=0)
    words = backbone.get_input_embeddings().weight
    ids = tokenizer(dataset.item_titles[5], add_special_tokens=False)["input_ids"]
    assert torch.allclose(model.collab_items.weight[5], words[ids].mean(0))
    assert torch.equal(model.collab_items.weight, model.content_items.weight)
    assert torch.allclose(model.collab_users.weight[0], model.collab_items.weight[split.train[0]].mean(0))
