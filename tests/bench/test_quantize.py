"""--quantize int8: the language model's linear layers become int8, the vision side stays as it was."""

from __future__ import annotations

import pytest
import torch
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

import vlmzip
from conftest import make_llava, make_llava_processor, random_images
from vlmzip.bench.quantize import quantize_language_model, quantized_bytes

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"


def test_int8_language_model_only():
    model, processor = make_llava(), make_llava_processor()
    inputs = processor(images=random_images(1), text=[PROMPT], return_tensors="pt")
    tower_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
    before = quantized_bytes(model)
    assert quantize_language_model(model, "int8") is model
    linears = [m for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    assert not linears  # every linear layer of the language model is quantized
    assert isinstance(model.lm_head, DynamicLinear)
    assert all(
        isinstance(m, torch.nn.Linear)
        for m in model.model.multi_modal_projector.modules()
        if "linear" in str(type(m)).lower()
    )
    for key, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, tower_before[key])
    assert quantized_bytes(model) < before
    vlmzip.apply(model, dominant=54, contextual=10)
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1]
        assert logits.shape == reference.shape and torch.isfinite(logits).all()
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_none_and_bad_scheme():
    model = make_llava()
    assert quantize_language_model(model, "none") is model
    assert any(isinstance(m, torch.nn.Linear) for m in model.model.language_model.modules())
    with pytest.raises(ValueError, match="quantize"):
        quantize_language_model(model, "int4")


def test_replaced_float_weights_are_freed_and_shared_or_tied_ones_kept():
    """The float linear layers swapped out hold no memory afterwards (the swap itself keeps them referenced)."""
    model, processor = make_llava(), make_llava_processor()
    layers = model.model.language_model.layers
    # Share one layer's projection with another (as --shared-layer-weights does) and tie the head to the embeddings.
    layers[1].mlp.up_proj.weight = layers[0].mlp.up_proj.weight
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    old = [m for m in model.model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    old_head = model.lm_head
    quantize_language_model(model, "int8")
    assert old and all(m.weight.numel() == 0 for m in old)  # shared weights freed once no layer uses them
    embeddings = model.model.language_model.embed_tokens.weight
    assert old_head.weight is embeddings and embeddings.numel() > 0  # tied to a live parameter: kept
    inputs = processor(images=random_images(1), text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_flops_count_int8_linear_layers_like_float_ones():
    from vlmzip.bench.flops import linear_weights

    model = make_llava()
    before = linear_weights(model.model.language_model)
    quantize_language_model(model, "int8")
    assert before > 0 and linear_weights(model.model.language_model) == before
