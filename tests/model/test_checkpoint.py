"""Checkpoints: a save/load round trip scores identically; a damaged or mismatched one is refused."""

import json
import shutil

import pytest
import torch

from model.checkpoint import (EMBEDDINGS_FILE, META_FILE, CheckpointError, load_recommender, read_checkpoint,
                              save_tensors)
from model.cllm4rec import score_prompts
from model.prompts import build_recommend_prompt


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


def test_checkpoint_holds_only_safetensors_and_json(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir() if p.is_file()}
    assert names == {"checkpoint.json", "embeddings.safetensors", "split.safetensors", "ids.json", "metrics.jsonl"}
    meta = json.loads((tiny_checkpoint / META_FILE).read_text())
    assert meta["backbone"]["layers"] == 2 and meta["n_users"] == 120 and meta["n_items"] == 48
    assert set(meta["templates"]) == {"collaborative", "review", "item_text", "recommend", "anonymous_recommend"}
    assert meta["model_version"] and meta["metrics"]["val"]["recall@20"] >= 0


def test_round_trip_gives_identical_scores(tiny_checkpoint):
    first = load_recommender(tiny_checkpoint, "cpu")
    second = load_recommender(tiny_checkpoint, "cpu")
    split = first.checkpoint.split
    prompts = [build_recommend_prompt(first.space, u, split.train[u].tolist(), first.max_history) for u in range(10)]
    assert torch.equal(score_prompts(first.model, prompts), score_prompts(second.model, prompts))
    saved = read_checkpoint(tiny_checkpoint).embeddings["collab_items"]
    assert torch.equal(first.model.collab_items.weight, saved)


def test_truncated_file_is_refused(checkpoint_copy):
    path = checkpoint_copy / EMBEDDINGS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="embeddings.safetensors does not match its checksum"):
        read_checkpoint(checkpoint_copy)


def test_missing_file_and_missing_metadata_are_refused(checkpoint_copy):
    (checkpoint_copy / "ids.json").unlink()
    with pytest.raises(CheckpointError, match="ids.json is missing"):
        read_checkpoint(checkpoint_copy)
    (checkpoint_copy / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(checkpoint_copy)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        read_checkpoint(checkpoint_copy / "nope")
    with pytest.raises(CheckpointError, match="not a usable path"):
        read_checkpoint(checkpoint_copy / ("x" * 300))  # longer than a file name may be


def edit_meta(directory, change):
    meta = json.loads((directory / META_FILE).read_text())
    change(meta)
    (directory / META_FILE).write_text(json.dumps(meta))


def test_newer_format_is_refused_with_the_versions(checkpoint_copy):
    edit_meta(checkpoint_copy, lambda m: m.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99, this cllm4rec reads versions 1, 2"):
        read_checkpoint(checkpoint_copy)


def test_shape_mismatch_is_refused(checkpoint_copy):
    tables = read_checkpoint(checkpoint_copy).embeddings
    tables["collab_items"] = tables["collab_items"][:-1]
    save_tensors(checkpoint_copy / EMBEDDINGS_FILE, tables)
    from model.checkpoint import sha256_file

    edit_meta(checkpoint_copy, lambda m: m["files"].update({EMBEDDINGS_FILE: sha256_file(checkpoint_copy / EMBEDDINGS_FILE)}))
    with pytest.raises(CheckpointError, match=r"collab_items has shape \(47, 32\), expected \(48, 32\)"):
        read_checkpoint(checkpoint_copy)


def test_backbone_of_another_width_is_refused(checkpoint_copy, make_backbone):
    wider = make_backbone("llama", hidden=48)
    edit_meta(checkpoint_copy, lambda m: m["backbone"].update(name=str(wider)))
    with pytest.raises(CheckpointError, match="trained on 300 of width 32"):
        load_recommender(checkpoint_copy, "cpu")


@pytest.mark.parametrize("change, message", [
    (lambda m: m["files"].pop("ids.json"), "no checksum for ids.json"),
    (lambda m: m.update(files=[]), "no checksum for embeddings.safetensors, split.safetensors, ids.json"),
    (lambda m: m["backbone"].pop("hidden_size"), "backbone must give name, layers, n_words, hidden_size"),
])
def test_incomplete_metadata_is_refused(checkpoint_copy, change, message):
    edit_meta(checkpoint_copy, change)
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(checkpoint_copy)


def test_item_texts_are_kept_and_a_checkpoint_without_them_reads_its_titles(checkpoint_copy, synthetic_data):
    """Live items are placed by their text's similarity to the catalogue's texts (title and description),
    which the checkpoint keeps; a checkpoint written before it kept them places by its titles."""
    from model.checkpoint import IDS_FILE, sha256_file
    from model.data import load_dataset

    assert read_checkpoint(checkpoint_copy).item_texts == load_dataset(synthetic_data).item_texts
    ids = json.loads((checkpoint_copy / IDS_FILE).read_text())
    del ids["texts"]
    (checkpoint_copy / IDS_FILE).write_text(json.dumps(ids))
    edit_meta(checkpoint_copy, lambda m: m["files"].update({IDS_FILE: sha256_file(checkpoint_copy / IDS_FILE)}))
    assert read_checkpoint(checkpoint_copy).item_texts == ids["titles"]
