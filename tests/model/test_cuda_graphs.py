"""The CUDA-graph backbone (model/cuda_graphs.py): its pass reads nothing on the host (a capture's
condition), and a pass padded to its bucket scores as the plain pass does. Run here with each bucket's pass
eager (capture=False, the same static buffers and padding); with CUDA, the captured graphs against
PyTorch's eager passes as well."""

from __future__ import annotations

import pytest
import torch

from model.backbone import load_backbone
from model.cllm4rec import COLLAB, CLLM4Rec, pad, score_prompts
from model.cuda_graphs import GraphedBackbone, MaskedBackbone, batch_buckets, length_buckets
from model.prompts import PromptTemplates, TokenSpace, build_recommend_prompt, longest_recommend_prompt


def test_buckets_cover_every_batch_and_length_up_to_the_largest():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(1) == [1]
    assert length_buckets(16) == [16]
    assert length_buckets(33) == [16, 32, 48]


def model_and_prompts(tiny_llama, readout: bool, device: str = "cpu"):
    backbone, tokenizer = load_backbone(str(tiny_llama), device=device)
    torch.manual_seed(0)
    model = CLLM4Rec(backbone, 6, 40, head_offsets=readout, head_readout=readout).to(device)
    with torch.no_grad():
        model.head_readout.normal_(std=0.1)
    space = TokenSpace(tokenizer, model.n_words, 6, 40, PromptTemplates())
    prompts = [build_recommend_prompt(space, u % 6, list(range(u % 7, 5 * (u % 7) + 1)), 20) for u in range(11)]
    return model, space, prompts


def test_the_mask_made_in_the_pass_gives_the_model_own_states(tiny_llama):
    """Real positions of right-padded prompts get the states the model's own 2D-mask path gives them."""
    model, _, prompts = model_and_prompts(tiny_llama, readout=True)
    ids, mask = pad(prompts[:5])
    embeds = model.embed(ids, COLLAB)
    with torch.no_grad():
        reference = model.backbone.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                                              output_hidden_states=True)
        last, inner = MaskedBackbone(model.backbone, every_layer=True)(embeds, mask)
    real = mask.bool()
    torch.testing.assert_close(last[real], reference.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inner[:, real], torch.stack(reference.hidden_states[1:-1])[:, real],
                               rtol=1e-5, atol=1e-5)


def test_the_pass_reads_nothing_on_the_host(tiny_llama):
    """A CUDA graph's capture forbids reading a device tensor on the host. On the meta device, which holds
    no values to read, the pass with its mask made inside runs through; the model's own 2D-mask path
    reads the mask (to skip it for unpadded batches) and cannot."""
    backbone, _ = load_backbone(str(tiny_llama))
    backbone = backbone.to("meta")
    embeds = torch.zeros(2, 16, backbone.config.hidden_size, device="meta")
    mask = torch.ones(2, 16, dtype=torch.long, device="meta")
    with torch.no_grad():
        last, inner = MaskedBackbone(backbone, every_layer=True)(embeds, mask)
        assert last.shape == embeds.shape and inner.shape[1:] == embeds.shape
        with pytest.raises(RuntimeError, match="meta"):
            backbone.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False)


@pytest.mark.parametrize("readout", [False, True])
def test_passes_padded_to_their_bucket_score_as_plain_passes(tiny_llama, readout):
    """Batches of every size (one beyond the largest bucket: eager), alone and after larger ones whose
    leftovers must not count as padding, score as without buckets; the head reads the last state alone or,
    with a readout, every layer's states."""
    model, space, prompts = model_and_prompts(tiny_llama, readout)
    batches = [prompts[:1], prompts[:8], prompts[3:6], prompts[:11], prompts[5:6], prompts[2:4]]
    references = [score_prompts(model, batch) for batch in batches]
    model.inference_backbone = GraphedBackbone.of(model, max_batch_size=8,
                                                  max_tokens=longest_recommend_prompt(space, 20), capture=False)
    assert sorted({key[0] for key in model.inference_backbone.buckets}) == [1, 2, 4, 8]
    for batch, reference in zip(batches, references):
        torch.testing.assert_close(score_prompts(model, batch), reference, rtol=1e-5, atol=1e-5)


def test_the_longest_prompt_fits_a_bucket(tiny_llama):
    model, space, _ = model_and_prompts(tiny_llama, readout=False)
    longest = longest_recommend_prompt(space, 20)
    assert longest == max(len(build_recommend_prompt(space, user, list(range(30)), 20)) for user in (0, None))
    runner = GraphedBackbone.of(model, max_batch_size=4, max_tokens=longest, capture=False)
    assert runner.bucket_for(4, longest) is not None and runner.bucket_for(5, longest) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("readout", [False, True])
def test_captured_graphs_rank_as_eager_passes_on_cuda(tiny_llama, readout):
    """Replayed graphs (bfloat16 autocast, as eager CUDA passes) give the eager passes' scores to bfloat16's
    rounding, at every batch size and after a reuse of each bucket."""
    model, space, prompts = model_and_prompts(tiny_llama, readout, device="cuda")
    batches = [prompts[:1], prompts[:8], prompts[3:6], prompts[:11], prompts[5:6]]
    references = [score_prompts(model, batch) for batch in batches]
    model.inference_backbone = GraphedBackbone.of(model, max_batch_size=8,
                                                  max_tokens=longest_recommend_prompt(space, 20))
    for _ in range(2):
        for batch, reference in zip(batches, references):
            torch.testing.assert_close(score_prompts(model, batch), reference, rtol=2e-2, atol=2e-2)
