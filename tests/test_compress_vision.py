"""compress_vision on real transformers towers against the eager `output_attentions=True` reference."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

import vlmzip
from conftest import clip_vision_config
from vlmzip import probe as probe_module
from vlmzip.core import visionzip_reduce
from vlmzip.probe import probe_vision_tower, received_attention


def eager_reference(tower, pixel_values, dominant, contextual, feature_layer=-2):
    """Hidden states and attention maps from an eager pass; keys recomputed from the layer's input."""
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    finally:
        tower.set_attn_implementation("sdpa")
    num_layers = len(out.attentions)
    layer_index = feature_layer % (num_layers + 1) - 1
    features = out.hidden_states[feature_layer]
    attentions = out.attentions[layer_index]
    encoder = getattr(tower, "vision_model", tower).encoder
    layers = encoder.layers if hasattr(encoder, "layers") else encoder.layer
    layer = layers[layer_index]
    norm = layer.layer_norm1 if hasattr(layer, "layer_norm1") else layer.norm1
    attention = layer.self_attn if hasattr(layer, "self_attn") else layer.attention
    with torch.no_grad():
        keys = attention.k_proj(norm(out.hidden_states[layer_index]))
    batch, num_tokens, _ = keys.shape
    heads = attentions.shape[1]
    keys = keys.view(batch, num_tokens, heads, -1).mean(dim=2)
    cls_scores = attentions[:, :, 0, 1:].sum(dim=1)
    return visionzip_reduce(features, cls_scores, keys, dominant, contextual), out


def pixels(batch, size, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("image_size", "patch_size", "batch", "dominant", "contextual", "feature_layer"),
    [(336, 14, 1, 54, 10, -2), (336, 14, 3, 108, 20, -2), (224, 16, 2, 20, 5, -2), (224, 16, 2, 30, 6, -1)],
)
def test_clip_equals_eager_reference(image_size, patch_size, batch, dominant, contextual, feature_layer):
    torch.manual_seed(image_size + batch)
    tower = CLIPVisionModel(clip_vision_config(image_size, patch_size)).eval()
    assert tower.config._attn_implementation == "sdpa"
    pixel_values = pixels(batch, image_size)
    expected, _ = eager_reference(tower, pixel_values, dominant, contextual, feature_layer)
    with torch.no_grad():
        result = vlmzip.compress_vision(
            tower, pixel_values, dominant=dominant, contextual=contextual, feature_layer=feature_layer
        )
    assert torch.equal(result.kept_indices, expected.kept_indices)
    assert result.kept_indices.shape == (batch, dominant)
    torch.testing.assert_close(result.features, expected.features, rtol=0, atol=1e-5)
    assert tower.config._attn_implementation == "sdpa"


def test_dinov2_equals_eager_reference(dinov2_tower):
    pixel_values = pixels(2, 336, seed=3)  # 24 x 24 patches, position embeddings interpolated
    expected, _ = eager_reference(dinov2_tower, pixel_values, 54, 10)
    with torch.no_grad():
        result = vlmzip.compress_vision(dinov2_tower, pixel_values, dominant=54, contextual=10)
    assert result.features.shape == (2, 64, 32)
    assert torch.equal(result.kept_indices, expected.kept_indices)
    torch.testing.assert_close(result.features, expected.features, rtol=0, atol=1e-5)


def test_probe_features_equal_hidden_states(clip_tower):
    pixel_values = pixels(2, 336, seed=4)
    with torch.no_grad():
        probe = probe_vision_tower(clip_tower, pixel_values, -2)
        out = clip_tower(pixel_values=pixel_values, output_hidden_states=True)
    torch.testing.assert_close(probe.features, out.hidden_states[-2], rtol=0, atol=1e-6)
    assert probe.grid == (24, 24) and probe.has_cls and probe.num_prefix_tokens == 1


def hook_counts(module):
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules()]


def test_layers_after_feature_layer_never_run(clip_tower):
    hooks_before = hook_counts(clip_tower)
    calls = []
    handle = clip_tower.encoder.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    post_norm = clip_tower.post_layernorm.register_forward_hook(lambda *a: calls.append(2))
    try:
        with torch.no_grad():
            vlmzip.compress_vision(clip_tower, pixels(1, 336), dominant=54, contextual=10)
    finally:
        handle.remove()
        post_norm.remove()
    assert calls == []
    assert hook_counts(clip_tower) == hooks_before  # no hook of ours is left behind


def test_received_attention_for_towers_without_cls():
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=112, patch_size=14
    )
    torch.manual_seed(5)
    tower = SiglipVisionModel(config).eval()
    pixel_values = pixels(2, 112, seed=5)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    tower.set_attn_implementation("sdpa")
    expected_scores = out.attentions[-2].sum(dim=1).mean(dim=1)  # sum heads, average queries
    with torch.no_grad():
        probe = probe_vision_tower(tower, pixel_values, -2, query_chunk=7)  # chunking must not change it
        result = vlmzip.compress_vision(tower, pixel_values, dominant=10, contextual=4)
    torch.testing.assert_close(probe.scores, expected_scores, rtol=1e-5, atol=1e-6)
    assert not probe.has_cls
    assert torch.equal(result.kept_indices, expected_scores.topk(10, dim=1).indices.sort(dim=1).values)


def _literal_received_attention(queries, keys, scale):
    """The whole (B, H, N, N) softmax at once: attention each key receives, mean over queries, sum over heads."""
    logits = torch.einsum("bqhd,bkhd->bhqk", queries.double(), keys.double()) * scale
    return logits.softmax(dim=-1).sum(dim=1).mean(dim=1)


@pytest.mark.parametrize("chunk", [None, 1, 5, 23, 1000])
def test_received_attention_blocks_do_not_change_the_scores(chunk, monkeypatch):
    generator = torch.Generator().manual_seed(3)
    queries, keys = torch.randn(2, 23, 3, 8, generator=generator), torch.randn(2, 23, 3, 8, generator=generator)
    # 2 x 3 x 23 = 138 probabilities per query row: a 300-element block holds 2 rows, the last block 1.
    monkeypatch.setattr(probe_module, "SCORE_BLOCK_ELEMENTS", 300)
    scores = received_attention(queries, keys, 0.35, chunk)
    assert scores.dtype == torch.float32 and scores.shape == (2, 23)
    torch.testing.assert_close(scores.double(), _literal_received_attention(queries, keys, 0.35), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.sum(dim=1), torch.full((2,), 3.0))  # every head's row sums to 1


def test_received_attention_default_block_size(monkeypatch):
    seen = []
    original = torch.matmul

    def recording_matmul(left, right):
        seen.append(left.shape[-2])  # the block's query rows
        return original(left, right)

    queries = keys = torch.randn(1, 50, 2, 4)
    monkeypatch.setattr(probe_module, "SCORE_BLOCK_ELEMENTS", 1000)  # 1000 // (1 x 2 x 50) = 10 rows a block
    monkeypatch.setattr(probe_module.torch, "matmul", recording_matmul)
    received_attention(queries, keys, 0.5)
    assert seen == [10] * 5
    seen.clear()
    monkeypatch.setattr(probe_module, "SCORE_BLOCK_ELEMENTS", 10)  # fewer than one row: one query at a time
    received_attention(queries, keys, 0.5)
    assert seen == [1] * 50


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True])
def test_received_attention_refuses_bad_chunks(chunk):
    with pytest.raises(ValueError, match="query_chunk must be a positive int or None"):
        received_attention(torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 2), 1.0, chunk)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dominant": 0}, ValueError, "dominant"),
        ({"contextual": -1}, ValueError, "contextual"),
        ({"dominant": 2.5}, TypeError, "dominant"),
        ({"dominant": 570, "contextual": 10}, ValueError, r"dominant \+ contextual must be <= 577"),
        ({"feature_layer": -5}, ValueError, "feature_layer"),
        ({"feature_layer": 0}, ValueError, "feature_layer"),
        ({"method": "magic"}, ValueError, "method"),
    ],
)
def test_bad_arguments(clip_tower, kwargs, error, match):
    with pytest.raises(error, match=match):
        vlmzip.compress_vision(clip_tower, pixels(1, 336), **kwargs)


def test_bad_pixel_values(clip_tower):
    with pytest.raises(ValueError, match="pixel_values"):
        vlmzip.compress_vision(clip_tower, torch.randn(3, 336, 336))
    with pytest.raises(TypeError, match="pixel_values"):
        vlmzip.compress_vision(clip_tower, torch.zeros(1, 3, 336, 336, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        vlmzip.compress_vision(clip_tower, torch.randn(1, 4, 336, 336))
    with pytest.raises(TypeError, match="pixel_values"):
        vlmzip.compress_vision(clip_tower, [[0.0]])


def test_unsupported_tower():
    with pytest.raises(ValueError, match="vision_model: unsupported vision tower Linear"):
        vlmzip.compress_vision(torch.nn.Linear(3, 3), pixels(1, 336))
    with pytest.raises(TypeError, match="vision_model"):
        vlmzip.compress_vision("clip", pixels(1, 336))
