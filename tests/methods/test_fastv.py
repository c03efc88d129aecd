"""FastV inside the language model of a tiny random LLaVA: what is pruned, where, and that nothing else changes."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from conftest import IMAGE_TOKEN_ID, make_llava, make_llava_processor, random_images
from vlmzip.compat import output_cache, passed_cache
from vlmzip.methods.fastv import FastV

PROMPTS = [
    "USER: <image> what is in the image ? ASSISTANT:",
    "USER: <image> a big red circle left of a small blue square ? what shape is above ? ASSISTANT:",
]
NEW_TOKENS = 4


def make_model(layers: int = 3) -> LlavaForConditionalGeneration:
    config = copy.deepcopy(make_llava().config)
    config.text_config.num_hidden_layers = layers
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def inputs():
    processor = make_llava_processor()
    return processor(images=random_images(2, seed=5), text=PROMPTS, return_tensors="pt", padding=True)


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, output_scores=True,
            return_dict_in_generate=True, **kwargs,
        )  # fmt: skip


class MaskingReference:
    """The same pruning expressed by masking: layers >= K may not attend to the dropped image tokens."""

    def __init__(self, model, layer: int, dropped: torch.Tensor):
        self.dropped = dropped  # (B, L) bool over the prompt
        self.handles = [
            decoder.register_forward_pre_hook(self.mask, with_kwargs=True)
            for decoder in model.model.language_model.layers[layer:]
        ]

    def mask(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        batch, q_length = hidden.shape[:2]
        kv_length = mask.shape[-1] if mask is not None else q_length
        if mask is None:  # sdpa without padding: plain causal
            mask = torch.ones(q_length, kv_length, dtype=torch.bool).tril(kv_length - q_length)[None, None]
        dropped = torch.zeros(batch, kv_length, dtype=torch.bool)
        dropped[:, : self.dropped.shape[1]] = self.dropped
        return args, {**kwargs, "attention_mask": mask & ~dropped[:, None, None, :]}

    def close(self):
        for handle in self.handles:
            handle.remove()


def test_keeps_budget_after_layer_k_only(model, inputs):
    lengths = {}

    def record(index):
        def hook(module, args, kwargs):
            lengths.setdefault(index, (args[0] if args else kwargs["hidden_states"]).shape)

        return hook

    fastv = FastV(model, tokens=64, image_tokens=576).install()
    # Registered after FastV's own hooks, so they see what each layer really receives.
    layers = model.model.language_model.layers
    handles = [decoder.register_forward_pre_hook(record(i), with_kwargs=True) for i, decoder in enumerate(layers)]
    try:
        out = generate(model, inputs)
    finally:
        fastv.remove()
        for handle in handles:
            handle.remove()
    full = inputs["input_ids"].shape[1]
    pruned = full - 576 + 64
    assert lengths[0][1] == lengths[1][1] == full  # the first K = 2 layers see every token
    assert lengths[2][1] == pruned
    kept = fastv.last_kept
    assert kept.shape == (2, pruned)
    assert ((inputs["input_ids"].gather(1, kept) == IMAGE_TOKEN_ID).sum(dim=1) == 64).all()
    cache = output_cache(out)
    assert [cache.layers[i].keys.shape[-2] for i in range(3)] == [full + NEW_TOKENS - 1] * 2 + [pruned + NEW_TOKENS - 1]


def test_ranks_image_tokens_by_last_token_attention(model, inputs):
    with FastV(model, tokens=64, image_tokens=576) as fastv, torch.no_grad():
        model(**inputs)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    scores = attentions[1][:, :, -1].mean(dim=1)  # layer K - 1, last token, averaged over heads
    visual = inputs["input_ids"] == IMAGE_TOKEN_ID
    for row in range(2):
        top = scores[row].masked_fill(~visual[row], float("-inf")).topk(64).indices
        kept = fastv.last_kept[row]
        assert set(kept[visual[row, kept]].tolist()) == set(top.tolist())


def test_equals_masking_the_dropped_tokens(model, inputs):
    with FastV(model, tokens=32, image_tokens=576) as fastv:
        pruned = generate(model, inputs)
    dropped = inputs["input_ids"] == IMAGE_TOKEN_ID
    dropped.scatter_(1, fastv.last_kept, False)
    reference = MaskingReference(model, 2, dropped)
    try:
        masked = generate(model, inputs)
    finally:
        reference.close()
    assert torch.equal(pruned.sequences, masked.sequences)
    for step in range(NEW_TOKENS):  # prefill and every decoding step
        torch.testing.assert_close(pruned.scores[step], masked.scores[step], atol=1e-4, rtol=1e-4)


def test_batched_equals_per_sample(model, inputs):
    with FastV(model, tokens=16, image_tokens=576):
        batch = generate(model, inputs).sequences[:, -NEW_TOKENS:]
        processor = make_llava_processor()
        for row in range(2):
            single = processor(images=random_images(2, seed=5)[row], text=PROMPTS[row], return_tensors="pt")
            assert torch.equal(generate(model, single).sequences[0, -NEW_TOKENS:], batch[row])


@pytest.mark.parametrize("generate_kwargs", [{"use_cache": False}, {"num_beams": 2}], ids=["no-cache", "beam"])
def test_other_generation_modes(model, inputs, generate_kwargs):
    with FastV(model, tokens=16, image_tokens=576):
        out = generate(model, inputs, **generate_kwargs)
    assert out.sequences.shape == (2, inputs["input_ids"].shape[1] + NEW_TOKENS)


def test_full_budget_and_removal_change_nothing(model, inputs):
    with torch.no_grad():
        expected = model(**inputs).logits
    with FastV(model, tokens=576, image_tokens=576), torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)  # nothing to prune: the model runs untouched
    with FastV(model, tokens=8, image_tokens=576), torch.no_grad():
        assert model(**inputs).logits.shape[1] < expected.shape[1]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    assert not model.model.language_model.layers[2]._forward_pre_hooks


def test_bad_arguments(model, inputs):
    with pytest.raises(ValueError, match=r"layer must be an integer in \[1, 2\]"):
        FastV(model, tokens=64, layer=3)
    with pytest.raises(ValueError, match="tokens"):
        FastV(model, tokens=0)
    with pytest.raises(ValueError, match=r"tokens must be an integer in \[1, 576\]"):
        FastV(model, tokens=577, image_tokens=576)
    with pytest.raises(TypeError, match="model"):
        FastV("llava", tokens=64)
    with pytest.raises(ValueError, match="language_model"):
        FastV(torch.nn.Linear(2, 2), tokens=64)
    fastv = FastV(model, tokens=8, image_tokens=576).install()
    try:
        with pytest.raises(ValueError, match="already installed"):
            fastv.install()
        processor = make_llava_processor()
        mixed = processor(
            images=random_images(1), text=[PROMPTS[0], "USER: how many ? ASSISTANT:"], return_tensors="pt", padding=True
        )
        with pytest.raises(ValueError, match="same number of image tokens"), torch.no_grad():
            model(**mixed)
    finally:
        fastv.remove()


def test_m_rope_models_are_refused():
    from conftest import make_qwen2_vl

    qwen = make_qwen2_vl()
    assert "M-RoPE" in FastV.unsupported_reason(qwen)
    with pytest.raises(ValueError, match="M-RoPE"):
        FastV(qwen, tokens=16, image_tokens=64)
    assert FastV.unsupported_reason(make_model(2)) is None


def test_cache_is_found_under_any_keyword():
    from transformers import DynamicCache

    cache = DynamicCache()
    assert passed_cache({"past_key_values": cache}) is cache  # transformers < 5.25
    assert passed_cache({"cache": cache}) is cache  # transformers >= 5.25
    assert passed_cache({"kv_cache_of_a_later_release": cache}) is cache
    assert passed_cache({"cache": None, "attention_mask": torch.ones(1, 2)}) is None


def test_decoding_step_keeps_the_prefill_choice_whatever_the_cache_keyword(model, inputs):
    """transformers 5.25 hands the language model `cache=` instead of `past_key_values=`: still a decoding step."""
    fastv = FastV(model, tokens=16, image_tokens=576).install()
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        kept = fastv._keep
        assert kept is not None
        step = {"inputs_embeds": torch.zeros(2, 1, model.config.text_config.hidden_size)}
        for keyword in ("cache", "past_key_values"):
            fastv._on_language_model(model.model.language_model, (), {**step, keyword: output_cache(out)})
            assert fastv._keep is kept
    finally:
        fastv.remove()


def test_unexpected_decoder_arguments_fail_clearly(model, inputs):
    """A release that lays out masks differently gets a message naming FastV and the version, not a shape error."""
    fastv = FastV(model, tokens=16, image_tokens=576).install()
    try:
        with torch.no_grad():
            model(**inputs, use_cache=True)
        fastv._prefill = None  # decoding
        layer = model.model.language_model.layers[2]
        hidden = torch.zeros(2, 1, model.config.text_config.hidden_size)
        short_mask = torch.ones(2, 1, 1, 3, dtype=torch.bool)
        with pytest.raises(
            ValueError, match=r"FastV cannot prune this model with transformers 5\.\d+.*decoding attention"
        ):
            fastv._on_pruned_layer(layer, (hidden,), {"attention_mask": short_mask})
    finally:
        fastv.remove()
