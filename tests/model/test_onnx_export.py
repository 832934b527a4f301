"""The backbone's ONNX export: the later blocks repeated from the second, and the whole trace where that
cannot be trusted. (That the export scores as PyTorch does: tests/service/test_serve_precision.py.)"""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
import torch
from transformers.models.llama import modeling_llama

from model import onnx_export
from model.adapters import attach_adapters
from model.backbone import DEFAULT_BACKBONE, load_backbone
from model.onnx_backbone import MATCH_TOLERANCE, OnnxBackbone
from model.onnx_export import relative_error


@pytest.fixture(scope="module")
def four_block_llama(make_backbone):
    return make_backbone("llama", n_layers=4)


def pass_of(backbone, onnx_backbone: OnnxBackbone | None = None):
    """Last and inner states of a padded batch, through PyTorch or the exported graph."""
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(2, 6, backbone.get_input_embeddings().embedding_dim, generator=generator)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    with torch.no_grad():
        if onnx_backbone is not None:
            out = onnx_backbone(embeds, mask)
        else:
            out = backbone.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                                      output_hidden_states=True)
    real = mask.bool()
    return [state[real] for state in (out.hidden_states[1:] if out.hidden_states else [out.last_hidden_state])]


def test_exporting_leaves_the_models_own_states_alone(four_block_llama):
    """A backbone exported before its first PyTorch pass still reports each block's output once in its
    hidden states (the traced copy of its first blocks must not hook into the model's own blocks), and
    the export gives the same states."""
    untouched, _ = load_backbone(str(four_block_llama))
    exported, _ = load_backbone(str(four_block_llama))
    onnx_backbone = OnnxBackbone(exported, every_layer=True, threads=1)
    assert onnx_backbone.assembled
    for mine, reference in zip(pass_of(exported), pass_of(untouched)):
        torch.testing.assert_close(mine, reference)
    for mine, reference in zip(pass_of(exported, onnx_backbone), pass_of(untouched)):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4)


def test_blocks_that_differ_beyond_their_weights_are_traced_whole(four_block_llama):
    """Adapters on the last block make it another graph than the second: the whole backbone is traced."""
    backbone, _ = load_backbone(str(four_block_llama))
    for adapter in attach_adapters(backbone, rank=2, n_layers=1).values():
        torch.nn.init.normal_(adapter.up, std=0.5)
    onnx_backbone = OnnxBackbone(backbone, every_layer=False, threads=1)
    assert not onnx_backbone.assembled
    torch.testing.assert_close(pass_of(backbone, onnx_backbone)[-1], pass_of(backbone)[-1], rtol=1e-4, atol=1e-4)


def test_an_assembled_graph_that_computes_otherwise_is_traced_again(four_block_llama, monkeypatch):
    """A graph put together with the wrong weights (here the second block's in every later one) fails the
    check against PyTorch, and the whole backbone is traced instead."""
    backbone, _ = load_backbone(str(four_block_llama))
    repeat = onnx_export.repeat_last_block

    def with_second_blocks_weights(graph, scope, n_blocks, weights, *args):
        wrong = onnx_export.JoinedWeights(
            {name: weights[name.replace(f"{scope}.{name.split('.')[2]}.", f"{scope}.1.", 1)]
             if name.startswith(f"{scope}.") else tensor for name, tensor in weights.items()})
        assembled.append(repeat(graph, scope, n_blocks, wrong, *args))
        return assembled[-1]

    assembled = []
    monkeypatch.setattr(onnx_export, "repeat_last_block", with_second_blocks_weights)
    onnx_backbone = OnnxBackbone(backbone, every_layer=False, threads=1)
    assert assembled == [True], "the graph must have been put together (with the wrong weights)"
    assert not onnx_backbone.assembled
    torch.testing.assert_close(pass_of(backbone, onnx_backbone)[-1], pass_of(backbone)[-1], rtol=1e-4, atol=1e-4)


def test_norms_and_rotations_are_one_operator_each_and_sibling_products_one_product(four_block_llama, tmp_path):
    """The graph ONNX Runtime runs: each RMS norm one RMSNormalization, each rotation of queries or keys one
    RotaryEmbedding, the attention on unsplit heads, a block's query, key and value one product and its
    gate and up another, and the states still PyTorch's. Hugging Face's own functions are back in place
    after the export."""
    backbone, _ = load_backbone(str(four_block_llama))
    rotation = modeling_llama.apply_rotary_pos_emb
    assert onnx_export.export_backbone(backbone, every_layer=True, path=tmp_path / "backbone.onnx")
    graph = onnx.load(str(tmp_path / "backbone.onnx")).graph
    operators = Counter(node.op_type for node in graph.node)
    blocks = 4
    assert operators["RMSNormalization"] == 2 * blocks + 1
    assert operators["RotaryEmbedding"] == 2 * blocks
    assert operators["MatMul"] == 4 * blocks  # q|k|v, o, gate|up, down
    weights = {tensor.name for tensor in graph.initializer}
    assert not [node for node in graph.node if node.op_type == "Transpose" and node.input[0] not in weights
                and onnx_export.block_of(node, "base_model.layers") is not None], "the heads split in a block"
    assert {"Pow", "ReduceMean", "Neg", "Sqrt"}.isdisjoint(operators)
    assert modeling_llama.apply_rotary_pos_emb is rotation
    assert all("forward" not in vars(module) for module in backbone.modules())
    onnx_backbone = OnnxBackbone(backbone, every_layer=True, threads=1)
    for mine, reference in zip(pass_of(backbone, onnx_backbone), pass_of(backbone)):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-4)


def test_a_model_of_the_same_family_serving_during_an_export_computes_as_before(four_block_llama):
    """While one backbone is exported, Hugging Face's rotation is swapped in its modeling module for the
    whole process: another model of that family serving meanwhile in PyTorch (the model a reload
    replaces, in float32 or in the bfloat16 formats) gives the states it gave before."""
    exported, _ = load_backbone(str(four_block_llama))
    serving, _ = load_backbone(str(four_block_llama))
    rotation = modeling_llama.apply_rotary_pos_emb
    for dtype in (torch.float32, torch.bfloat16):
        serving.to(dtype)
        generator = torch.Generator().manual_seed(2)
        embeds = torch.randn(3, 5, serving.get_input_embeddings().embedding_dim, generator=generator).to(dtype)
        mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [1] * 4 + [0]])

        def states():
            with torch.no_grad():
                return serving.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        before = states()
        with onnx_export.rotations_as_one_operator(exported):
            assert modeling_llama.apply_rotary_pos_emb is not rotation, "swapped while exported"
            during = states()
        torch.testing.assert_close(during, before)


def test_norms_and_rotations_that_compute_otherwise_are_traced_as_written():
    """A norm that scales by 1 + weight (Gemma's) is not RMSNormalization, an interleaved rotation is not
    the halves' RotaryEmbedding: both stay as their model writes them."""
    class GemmaLikeRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))
            self.eps = 1e-6

        def forward(self, states):
            return states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    def interleaved_rotation(queries, keys, cos, sin):
        def rotate(states):
            pairs = states.unflatten(-1, (-1, 2))
            return torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return queries * cos + rotate(queries) * sin, keys * cos + rotate(keys) * sin

    assert onnx_export.computes_rms_norm(modeling_llama.LlamaRMSNorm(8, eps=1e-6))
    assert not onnx_export.computes_rms_norm(GemmaLikeRMSNorm())
    assert onnx_export.rotates_as_onnx(modeling_llama.apply_rotary_pos_emb)
    assert not onnx_export.rotates_as_onnx(interleaved_rotation)


def test_an_attention_that_norms_its_heads_keeps_them_split(tmp_path):
    """Qwen3 norms each head's queries and keys after the split: its attention is traced as written (the
    heads split and transposed), and the export still computes what PyTorch does."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(Qwen3Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.2)).eval()
    assert onnx_export.export_backbone(backbone, every_layer=False, path=tmp_path / "backbone.onnx")
    graph = onnx.load(str(tmp_path / "backbone.onnx")).graph
    weights = {tensor.name for tensor in graph.initializer}
    split = [node for node in graph.node if node.op_type == "Transpose" and node.input[0] not in weights
             and onnx_export.block_of(node, "base_model.layers") is not None]
    assert len(split) == 4 * 3  # queries, keys and values split, the output joined, in each block
    assert Counter(node.op_type for node in graph.node)["RMSNormalization"] == 4 * 3 + 1
    assert all("forward" not in vars(module) for module in backbone.modules())
    onnx_backbone = OnnxBackbone(backbone, every_layer=False, threads=1)
    assert onnx_backbone.assembled
    torch.testing.assert_close(pass_of(backbone, onnx_backbone)[-1], pass_of(backbone)[-1], rtol=1e-4, atol=1e-4)


def test_rounding_in_a_massive_channel_passes_the_check_and_another_state_does_not():
    """LLM states carry a few channels far larger than the rest (SmolLM2's reach 2*10^4 beside channels
    near 1); float32 rounding there moves every channel by about the largest one's ulp. The check holds
    such states as equal, and states of another computation as different."""
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(3, 5, 64, generator=generator)
    reference[..., 0] = 2e4
    rounded = reference + 5e-3 * torch.randn(reference.shape, generator=generator)  # 2.5e-7 of the state's length
    assert not torch.allclose(rounded, reference, rtol=1e-3, atol=1e-3)  # what a per-element check would say
    assert relative_error(rounded, reference) <= MATCH_TOLERANCE
    other = reference.clone()
    other[..., 1:] = torch.randn(3, 5, 63, generator=generator) * 300  # the massive channel alike, the rest not
    assert relative_error(other, reference) > MATCH_TOLERANCE


@pytest.mark.slow
def test_the_bundled_backbone_at_full_depth_is_assembled_and_matches():
    """SmolLM2's 30 layers with every layer's states (the readout head's input): the repeated graph passes
    the check against PyTorch. On an AVX-512 BF16 CPU a per-element check failed it, and the trainer's
    validation and the server fell back to PyTorch."""
    backbone, _ = load_backbone(DEFAULT_BACKBONE)
    onnx_backbone = OnnxBackbone(backbone, every_layer=True, threads=torch.get_num_threads())
    assert onnx_backbone.assembled
    assert onnx_backbone.matches(backbone)
