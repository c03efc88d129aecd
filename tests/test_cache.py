"""ImageCache: hits skip the tower and the selection, outputs stay bit-identical, memory stays bounded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import vlmzip
from conftest import make_llava, make_llava_processor, make_qwen2_5_vl, make_qwen_processor, qwen_prompt, random_images
from families import make_onevision, make_onevision_processor, make_qwen3_processor, make_qwen3_vl, random_video
from helpers import BUILDERS
from vlmzip.api import get_state
from vlmzip.cache import CachedVisual, ImageCache

LLAVA_PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
SIZES = [(300, 400), (120, 120), (90, 300), (200, 150)]


@dataclass
class Family:
    make_model: Callable[[], torch.nn.Module]
    make_processor: Callable[[], object]
    prompt: str
    tower: Callable[[torch.nn.Module], torch.nn.Module]


FAMILIES = {
    "llava": Family(*BUILDERS["llava-1.5"], LLAVA_PROMPT, lambda m: m.model.vision_tower),
    "llava_next": Family(*BUILDERS["llava-next"], LLAVA_PROMPT, lambda m: m.model.vision_tower),
    "onevision": Family(*BUILDERS["llava-onevision"], LLAVA_PROMPT, lambda m: m.model.vision_tower),
    "qwen2_vl": Family(*BUILDERS["qwen2-vl"], qwen_prompt("<image>"), lambda m: m.model.visual),
    "qwen2_5_vl": Family(*BUILDERS["qwen2.5-vl"], qwen_prompt("<image>"), lambda m: m.model.visual),
    "qwen3_vl": Family(*BUILDERS["qwen3-vl"], qwen_prompt("<image>"), lambda m: m.model.visual),
    "qwen3_5": Family(*BUILDERS["qwen3.5"], qwen_prompt("<image>"), lambda m: m.model.visual),
}


def apply_with_cache(model: torch.nn.Module, directory: Any = None, **options: Any) -> ImageCache:
    """Apply VisionZip (6 + 2 tokens, `options` added) to `model` with a fresh 16 MiB cache; return the cache."""
    cache = ImageCache(max_bytes=2**24, directory=directory)
    vlmzip.apply(model, dominant=6, contextual=2, cache=cache, **options)
    return cache


def pictures(count: int, first_seed: int = 0) -> list:
    return [random_images(1, seed=first_seed + i, size=SIZES[(first_seed + i) % len(SIZES)])[0] for i in range(count)]


class TowerCounter:
    """Counts forward calls of a vision tower and the leading size of each call's input."""

    def __init__(self, tower: torch.nn.Module) -> None:
        self.sizes: list[int] = []
        self.handle = tower.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        pixels = args[0] if args else next(iter(kwargs.values()))
        self.sizes.append(int(pixels.shape[0]))

    @property
    def calls(self) -> int:
        return len(self.sizes)

    def __enter__(self) -> TowerCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.handle.remove()


def assert_same_prepared(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "mm_encoder_outputs":
            assert a[key].keys() == b[key].keys()
            for modality in a[key]:
                first, second = a[key][modality].pooler_output, b[key][modality].pooler_output
                assert len(first) == len(second)
                for x, y in zip(first, second, strict=True):
                    assert torch.equal(x, y)
                # Qwen3-VL: the deepstack features of every layer, token for token.
                first_stack = getattr(a[key][modality], "deepstack_features", None)
                second_stack = getattr(b[key][modality], "deepstack_features", None)
                assert (first_stack is None) == (second_stack is None)
                for x_layer, y_layer in zip(first_stack or [], second_stack or [], strict=True):
                    assert len(x_layer) == len(y_layer)
                    for x, y in zip(x_layer, y_layer, strict=True):
                        assert torch.equal(x, y)
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> tuple[str, Family]:
    return request.param, FAMILIES[request.param]


def assert_same_answer(cached: torch.Tensor, raw: Any, uncached: torch.Tensor, prepared: Any) -> None:
    """generate() on raw inputs returns the caller's prompt, then the same new tokens as on prepared inputs."""
    prompt = raw["input_ids"]
    assert torch.equal(cached[:, : prompt.shape[1]], prompt)
    assert torch.equal(cached[:, prompt.shape[1] :], uncached[:, prepared["input_ids"].shape[1] :])


def test_hits_skip_the_tower_and_outputs_are_bit_identical(family):
    name, spec = family
    model, processor = spec.make_model(), spec.make_processor()
    images = pictures(2)
    inputs = processor(images=images, text=[spec.prompt] * 2, return_tensors="pt", padding=True)
    cache = apply_with_cache(model)
    with torch.no_grad():
        reference = vlmzip.prepare(model, inputs, cache=None)
        with TowerCounter(spec.tower(model)) as counter:
            first = vlmzip.prepare(model, inputs)
            assert counter.calls == 1 and (cache.hits, cache.misses) == (0, 2)
            second = vlmzip.prepare(model, inputs)
            assert counter.calls == 1, "a hit must not run the vision tower"
        assert (cache.hits, cache.misses) == (2, 2)
        assert_same_prepared(reference, first)
        assert_same_prepared(reference, second)
        # generate() preparing itself goes through the cache too, with the same tokens as without it.
        with TowerCounter(spec.tower(model)) as counter:
            cached = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert counter.calls == 0
        uncached = model.generate(**reference, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert_same_answer(cached, inputs, uncached, reference)
    assert len(cache) == 2 and 0 < cache.nbytes <= cache.max_bytes


def test_a_batch_mixing_hits_and_misses_encodes_the_misses_only(family):
    name, spec = family
    model, processor = spec.make_model(), spec.make_processor()
    old, new = pictures(1), pictures(2, first_seed=5)
    cache = apply_with_cache(model)
    batch = [new[0], old[0], new[1]]
    inputs = processor(images=batch, text=[spec.prompt] * 3, return_tensors="pt", padding=True)
    with torch.no_grad():
        vlmzip.prepare(model, processor(images=old, text=[spec.prompt], return_tensors="pt"))
        alone = [
            vlmzip.prepare(model, processor(images=[image], text=[spec.prompt], return_tensors="pt"), cache=None)
            for image in batch
        ]
        with TowerCounter(spec.tower(model)) as counter:
            mixed = vlmzip.prepare(model, inputs)
        assert counter.calls == 1
        assert (cache.hits, cache.misses) == (1, 3)
        features = mixed["mm_encoder_outputs"]["image"].pooler_output
        for index, single in enumerate(alone):
            assert torch.equal(features[index], single["mm_encoder_outputs"]["image"].pooler_output[0])
        logits = model(**mixed).logits
        reference = model(**vlmzip.prepare(model, inputs, cache=None)).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


def test_llava_hit_skips_the_images_of_a_batch_in_the_tower_call():
    model, processor = make_llava(), make_llava_processor()
    apply_with_cache(model)
    images = pictures(3)
    with torch.no_grad(), TowerCounter(model.model.vision_tower) as counter:
        vlmzip.prepare(model, processor(images=images[:2], text=[LLAVA_PROMPT] * 2, return_tensors="pt", padding=True))
        vlmzip.prepare(model, processor(images=images, text=[LLAVA_PROMPT] * 3, return_tensors="pt", padding=True))
    assert counter.sizes == [2, 1]  # the second call encodes the third image alone


def test_onevision_videos_and_images_are_cached_per_item():
    model, processor = make_onevision(), make_onevision_processor()
    cache = apply_with_cache(model)
    images, videos = pictures(2), [random_video(4, seed=3)]
    text = ["USER: <image> a <video> the <image> what ? ASSISTANT:"]
    inputs = processor(images=[images], videos=videos, text=text, return_tensors="pt")
    with torch.no_grad():
        reference = vlmzip.prepare(model, inputs, cache=None)
        first = vlmzip.prepare(model, inputs)
        with TowerCounter(model.model.vision_tower) as counter:
            second = vlmzip.prepare(model, inputs)
            # The same video alone, then one of the images in a single-image sample (more crops: a new item).
            vlmzip.prepare(model, processor(videos=videos, text=["USER: <video> a ? ASSISTANT:"], return_tensors="pt"))
            vlmzip.prepare(model, processor(images=images[:1], text=[LLAVA_PROMPT], return_tensors="pt"))
    assert counter.calls == 1
    assert (cache.hits, cache.misses) == (4, 4)
    assert_same_prepared(reference, first)
    assert_same_prepared(reference, second)


def test_qwen_positions_survive_a_hit():
    model, processor = make_qwen2_5_vl(), make_qwen_processor()
    cache = apply_with_cache(model)
    images = pictures(2)
    inputs = processor(images=[images], text=[qwen_prompt("<image>", "<image>")], return_tensors="pt")
    with torch.no_grad():
        reference = vlmzip.prepare(model, inputs, cache=None)
        vlmzip.prepare(model, inputs)
        hit = vlmzip.prepare(model, inputs)
    assert cache.hits == 2
    assert_same_prepared(reference, hit)


def test_memory_bound_is_honoured_with_lru_eviction():
    model, processor = make_llava(), make_llava_processor()
    probe = ImageCache(max_bytes=2**24)
    vlmzip.apply(model, dominant=6, contextual=2, cache=probe)
    images = pictures(3)
    with torch.no_grad():
        vlmzip.prepare(model, processor(images=images[:1], text=[LLAVA_PROMPT], return_tensors="pt"))
    entry_bytes = probe.nbytes
    vlmzip.remove(model)
    cache = ImageCache(max_bytes=2 * entry_bytes + entry_bytes // 2)
    vlmzip.apply(model, dominant=6, contextual=2, cache=cache)
    with torch.no_grad(), TowerCounter(model.model.vision_tower) as counter:
        for image in [images[0], images[1], images[0], images[2]]:  # images[1] is the least recently used
            vlmzip.prepare(model, processor(images=[image], text=[LLAVA_PROMPT], return_tensors="pt"))
            assert cache.nbytes <= cache.max_bytes
        assert len(cache) == 2 and cache.nbytes == 2 * entry_bytes
        assert counter.calls == 3
        vlmzip.prepare(model, processor(images=[images[0]], text=[LLAVA_PROMPT], return_tensors="pt"))
        assert counter.calls == 3  # kept
        vlmzip.prepare(model, processor(images=[images[1]], text=[LLAVA_PROMPT], return_tensors="pt"))
        assert counter.calls == 4  # evicted, encoded again
    assert cache.nbytes <= cache.max_bytes
    tiny = ImageCache(max_bytes=entry_bytes - 1)  # nothing fits: every lookup misses, nothing is held
    tiny.put("k" * 40, CachedVisual(torch.zeros(8, 64), full_count=576))
    assert len(tiny) == 0 and tiny.nbytes == 0


def test_budget_model_and_weights_are_part_of_the_key():
    model, processor = make_llava(), make_llava_processor()
    cache = ImageCache(max_bytes=2**24)
    inputs = processor(images=pictures(1), text=[LLAVA_PROMPT], return_tensors="pt")
    with torch.no_grad():
        vlmzip.apply(model, dominant=6, contextual=2, cache=cache)
        vlmzip.prepare(model, inputs)
        vlmzip.remove(model)
        vlmzip.apply(model, dominant=5, contextual=3, cache=cache)
        vlmzip.prepare(model, inputs)
        assert (cache.hits, cache.misses) == (0, 2)
        other = make_llava(seed=1)
        vlmzip.apply(other, dominant=5, contextual=3, cache=cache)
        vlmzip.prepare(other, inputs)
        assert (cache.hits, cache.misses) == (0, 3)
        model.model.multi_modal_projector.linear_1.weight.add_(1e-3)  # an in-place update of a visual weight
        changed = vlmzip.prepare(model, inputs)
        assert (cache.hits, cache.misses) == (0, 4)
        assert torch.equal(
            changed["mm_encoder_outputs"]["image"].pooler_output[0],
            vlmzip.prepare(model, inputs, cache=None)["mm_encoder_outputs"]["image"].pooler_output[0],
        )
        model.model.language_model.layers[0].mlp.up_proj.weight.add_(1.0)  # the language model is not
        vlmzip.prepare(model, inputs)
        assert cache.hits == 1


def test_remove_detaches_the_cache():
    model, processor = make_llava(), make_llava_processor()
    cache = apply_with_cache(model)
    adapter = get_state(model).adapter
    inputs = processor(images=pictures(1), text=[LLAVA_PROMPT], return_tensors="pt")
    with torch.no_grad():
        vlmzip.prepare(model, inputs)
        vlmzip.remove(model)
        assert adapter.cache is None
        with TowerCounter(model.model.vision_tower) as counter:
            model(**inputs)
            vlmzip.apply(model, dominant=6, contextual=2)  # no cache this time
            vlmzip.prepare(model, inputs)
        assert counter.calls == 2
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)


def test_clear_empties_memory_files_and_counters(tmp_path):
    model, processor = make_llava(), make_llava_processor()
    cache = apply_with_cache(model, directory=tmp_path)
    inputs = processor(images=pictures(1), text=[LLAVA_PROMPT], return_tensors="pt")
    (tmp_path / "notes.txt").write_text("kept")
    with torch.no_grad():
        vlmzip.prepare(model, inputs)
        vlmzip.prepare(model, inputs)
        cache.clear()
        assert (cache.hits, cache.misses, cache.nbytes, len(cache)) == (0, 0, 0, 0)
        assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]
        with TowerCounter(model.model.vision_tower) as counter:
            vlmzip.prepare(model, inputs)
        assert counter.calls == 1


def test_persistence_round_trip_and_bad_files_are_ignored(tmp_path):
    model, processor = make_llava(), make_llava_processor()
    images = pictures(2)
    inputs = processor(images=images, text=[LLAVA_PROMPT] * 2, return_tensors="pt", padding=True)
    writer = ImageCache(max_bytes=2**24, directory=tmp_path)
    vlmzip.apply(model, dominant=6, contextual=2, cache=writer)
    with torch.no_grad():
        written = vlmzip.prepare(model, inputs)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 2 and not list(tmp_path.glob(".tmp-*"))
    vlmzip.remove(model)

    reader = ImageCache(max_bytes=0, directory=str(tmp_path))  # memory holds nothing: every hit is a file
    vlmzip.apply(model, dominant=6, contextual=2, cache=reader)
    with torch.no_grad(), TowerCounter(model.model.vision_tower) as counter:
        read = vlmzip.prepare(model, inputs)
        assert counter.calls == 0 and reader.hits == 2
        assert_same_prepared(written, read)

        files[0].write_bytes(files[0].read_bytes()[:-7])  # truncated
        swapped = files[1].read_bytes()
        files[1].write_bytes(files[0].read_bytes())  # another entry's (broken) content under this name
        again = vlmzip.prepare(model, inputs)
        assert counter.calls == 1 and counter.sizes == [2]
        assert_same_prepared(written, again)
    assert swapped  # both files were rewritten with valid entries
    fresh = ImageCache(max_bytes=2**24, directory=tmp_path)
    vlmzip.remove(model)
    vlmzip.apply(model, dominant=6, contextual=2, cache=fresh)
    with torch.no_grad(), TowerCounter(model.model.vision_tower) as counter:
        vlmzip.prepare(model, inputs)
    assert counter.calls == 0


def test_a_file_with_a_valid_checksum_but_another_key_is_not_trusted(tmp_path):
    from safetensors.torch import load_file, save_file

    model, processor = make_llava(), make_llava_processor()
    cache = ImageCache(max_bytes=0, directory=tmp_path)
    vlmzip.apply(model, dominant=6, contextual=2, cache=cache)
    first, second = (processor(images=[image], text=[LLAVA_PROMPT], return_tensors="pt") for image in pictures(2))
    with torch.no_grad():
        vlmzip.prepare(model, first)
        (path,) = tmp_path.glob("*.safetensors")
        vlmzip.prepare(model, second)
        other = next(p for p in tmp_path.glob("*.safetensors") if p != path)
        other.write_bytes(path.read_bytes())  # a foreign entry (valid file, other key) under this name
        with TowerCounter(model.model.vision_tower) as counter:
            vlmzip.prepare(model, second)
        assert counter.calls == 1
        # Features whose width is not the language model's are refused even under the right key and metadata.
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        tensors["features"] = torch.zeros(8, 3)
        from vlmzip.cache import _checksum

        metadata["checksum"] = _checksum(tensors)
        save_file(tensors, str(path), metadata=metadata)
        with TowerCounter(model.model.vision_tower) as counter:
            vlmzip.prepare(model, first)
        assert counter.calls == 1


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="max_bytes"):
        ImageCache(max_bytes=-1)
    with pytest.raises(TypeError, match="max_bytes"):
        ImageCache(max_bytes="1GB")
    with pytest.raises(TypeError, match="max_bytes"):
        ImageCache(max_bytes=True)
    with pytest.raises(TypeError, match="max_bytes"):
        ImageCache(max_bytes=1.5)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ValueError, match="directory"):
        ImageCache(max_bytes=10, directory=afile)
    with pytest.raises(TypeError, match="directory"):
        ImageCache(max_bytes=10, directory=3)
    model = make_llava()
    with pytest.raises(TypeError, match="cache"):
        vlmzip.apply(model, dominant=6, contextual=2, cache={})
    assert not vlmzip.is_applied(model)
    vlmzip.apply(model, dominant=6, contextual=2)
    with pytest.raises(TypeError, match="cache"):
        vlmzip.prepare(model, {}, cache="yes")
    with pytest.raises(TypeError, match="entry"):
        ImageCache(max_bytes=10).put("k", torch.zeros(2))


def test_embedded_model_hits_skip_the_tower(default_model_and_processor):
    from vlmzip.prompts import build_prompt

    model, processor = default_model_and_processor
    cache = ImageCache(max_bytes=2**26)
    image = pictures(1)[0]
    inputs = processor(images=[image], text=[build_prompt(processor, "what color is it?")], return_tensors="pt")
    try:
        with torch.no_grad():
            prepared = vlmzip.prepare(vlmzip.apply(model, dominant=54, contextual=10), inputs)
            reference = model.generate(**prepared, max_new_tokens=6, do_sample=False)
            vlmzip.remove(model)
            vlmzip.apply(model, dominant=54, contextual=10, cache=cache)
            with TowerCounter(model.model.vision_tower) as counter:
                outputs = [model.generate(**inputs, max_new_tokens=6, do_sample=False) for _ in range(3)]
    finally:
        vlmzip.remove(model)
    assert counter.calls == 1
    assert (cache.hits, cache.misses) == (2, 1)
    for output in outputs:
        assert_same_answer(output, inputs, reference, prepared)


def test_conversation_reuses_an_image_shown_again():
    from vlmzip.conversation import Conversation

    model, processor = make_llava(), make_llava_processor()
    vlmzip.apply(model, dominant=6, contextual=2)
    image = pictures(1)[0]
    chat = Conversation(model, processor)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    with TowerCounter(model.model.vision_tower) as counter:
        chat.ask(LLAVA_PROMPT, images=[image], **kwargs)
        chat.ask("USER: how many are there ? ASSISTANT:", **kwargs)
        chat.ask("USER: <image> what is left of ? ASSISTANT:", images=[image], **kwargs)
    assert counter.calls == 1
    assert (chat.image_cache.hits, chat.image_cache.misses) == (1, 1)
    shared = ImageCache(max_bytes=2**24)
    other = Conversation(model, processor, cache=shared)
    with TowerCounter(model.model.vision_tower) as counter:
        other.ask(LLAVA_PROMPT, images=[image], **kwargs)
    assert counter.calls == 1 and shared.misses == 1
    vlmzip.remove(model)
    assert Conversation(model, processor).image_cache is None
    with pytest.raises(TypeError, match="cache"):
        Conversation(model, processor, cache=object())


def test_families_without_units_are_cached_per_call():
    """An adapter that cannot split its inputs per image still gets hits for a repeated call."""
    model, processor = make_llava(), make_llava_processor()
    cache = apply_with_cache(model)
    get_state(model).adapter.visual_units = lambda inputs: None  # what a family without per-image units returns
    images = pictures(3)
    pair = processor(images=images[:2], text=[LLAVA_PROMPT] * 2, return_tensors="pt", padding=True)
    other = processor(images=images[1:], text=[LLAVA_PROMPT] * 2, return_tensors="pt", padding=True)
    with torch.no_grad(), TowerCounter(model.model.vision_tower) as counter:
        reference = vlmzip.prepare(model, pair, cache=None)
        first = vlmzip.prepare(model, pair)
        second = vlmzip.prepare(model, pair)
        assert counter.sizes == [2, 2]  # the uncached reference, then the miss; the repeat ran nothing
        vlmzip.prepare(model, other)  # another set: encoded as a whole
        assert counter.sizes == [2, 2, 2]
    assert_same_prepared(reference, first)
    assert_same_prepared(reference, second)
    assert (cache.hits, cache.misses) == (2, 4)


def test_qwen3_vl_entries_hold_the_deepstack_features(tmp_path):
    """A Qwen3-VL hit (memory or disk) gives the language model the same main and deepstack features as a miss."""
    model, processor = make_qwen3_vl(), make_qwen3_processor()
    cache = apply_with_cache(model, directory=tmp_path)
    adapter = get_state(model).adapter
    layers = adapter.deepstack_layers
    assert layers > 0
    images = pictures(2)
    inputs = processor(images=[images], text=[qwen_prompt("<image>", "<image>")], return_tensors="pt")
    with torch.no_grad():
        reference = vlmzip.prepare(model, inputs, cache=None)
        first = vlmzip.prepare(model, inputs)
        stack = reference["mm_encoder_outputs"]["image"].deepstack_features
        assert len(stack) == layers and all(len(layer) == 2 for layer in stack)
        # Each entry is the main features followed by every deepstack layer's, along the channels.
        entries = list(cache._entries.values())
        assert len(entries) == 2
        assert {entry.features.shape[1] for entry in entries} == {adapter.text_width() * (1 + layers)}
        fresh = ImageCache(max_bytes=2**24, directory=tmp_path)  # only the files: a disk hit
        with TowerCounter(model.model.visual) as counter:
            memory_hit = vlmzip.prepare(model, inputs)
            disk_hit = vlmzip.prepare(model, inputs, cache=fresh)
        assert counter.calls == 0 and fresh.hits == 2
        for prepared in (first, memory_hit, disk_hit):
            assert_same_prepared(reference, prepared)
        logits = model(**disk_hit).logits
        expected = model(**reference).logits
    assert torch.equal(logits, expected)
    # An entry without the deepstack channels (e.g. written by a model without them) is never trusted.
    entry = next(iter(cache._entries.values()))
    narrow = CachedVisual(entry.features[:, : adapter.text_width()].clone(), entry.full_count, entry.slots)
    assert not adapter._fits(narrow, adapter.visual_units(inputs)[0])


def test_qwen3_vl_videos_are_cached_per_call():
    """A Qwen3-VL video spans one placeholder run per temporal slice: such calls are cached as a whole."""
    from adapters.test_qwen3_vl import video_inputs

    model, processor = make_qwen3_vl(), make_qwen3_processor()
    cache = apply_with_cache(model)
    inputs = video_inputs(processor, [(3, 8, 8)], image=pictures(1)[0])
    assert get_state(model).adapter.visual_units(inputs) is None
    with torch.no_grad():
        reference = vlmzip.prepare(model, inputs, cache=None)
        first = vlmzip.prepare(model, inputs)
        with TowerCounter(model.model.visual) as counter:
            second = vlmzip.prepare(model, inputs)
    assert counter.calls == 0
    assert (cache.hits, cache.misses) == (4, 4)  # the image and the video's three slices, as one call
    assert_same_prepared(reference, first)
    assert_same_prepared(reference, second)


PER_CALL_FAMILIES = {
    "gemma3": Family(*BUILDERS["gemma3"], "USER: <start_of_image> what ? ASSISTANT:", lambda m: m.model.vision_tower),
    "internvl": Family(*BUILDERS["internvl"], "USER: <IMG_CONTEXT> what ? ASSISTANT:", lambda m: m.model.vision_tower),
    "smolvlm": Family(*BUILDERS["smolvlm"], "USER: <image> what ? ASSISTANT:", lambda m: m.model.vision_model),
    "mistral3": Family(*BUILDERS["mistral3"], "USER: [IMG] what ? ASSISTANT:", lambda m: m.model.vision_tower),
}


@pytest.mark.parametrize("name", sorted(PER_CALL_FAMILIES))
def test_families_without_units_hit_a_repeated_call_bit_identically(name):
    spec = PER_CALL_FAMILIES[name]
    model, processor = spec.make_model(), spec.make_processor()
    cache = apply_with_cache(model)
    assert get_state(model).adapter.visual_units is not None
    images = [[image] for image in pictures(2)]
    inputs = processor(images=images, text=[spec.prompt] * 2, return_tensors="pt", padding=True)
    assert get_state(model).adapter.visual_units(inputs) is None
    with torch.no_grad():
        reference = vlmzip.prepare(model, inputs, cache=None)
        first = vlmzip.prepare(model, inputs)
        with TowerCounter(spec.tower(model)) as counter:
            second = vlmzip.prepare(model, inputs)
            assert counter.calls == 0, "a hit must not run the vision tower"
            cached = model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        uncached = model.generate(**reference, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert counter.calls == 0 and cache.hits >= 2
    assert_same_prepared(reference, first)
    assert_same_prepared(reference, second)
    assert_same_answer(cached, inputs, uncached, reference)


ADAPTIVE_ORIGINAL = {"attention_mass": 0.4, "max_dominant": 6, "positions": "original"}


def assert_hits_match_a_miss(model, inputs, tower, directory, options):
    """Hits (memory and disk) give the same tokens and the same original position ids as a miss."""
    apply_with_cache(model, directory=directory, **options)  # adaptive: at most 6 + 2
    with torch.no_grad():
        reference = vlmzip.prepare(model, inputs, cache=None)
        assert "position_ids" in reference
        first = vlmzip.prepare(model, inputs)
        with TowerCounter(tower) as counter:
            from_memory = vlmzip.prepare(model, inputs)
            from_disk = vlmzip.prepare(model, inputs, cache=ImageCache(max_bytes=2**24, directory=directory))
            cached = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert counter.calls == 0
        uncached = model.generate(**reference, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for prepared in (first, from_memory, from_disk):
        assert_same_prepared(reference, prepared)
    assert_same_answer(cached, inputs, uncached, reference)


@pytest.mark.parametrize("name", ["llava", "llava_next", "onevision"])
@pytest.mark.parametrize("options", [{"positions": "original"}, ADAPTIVE_ORIGINAL])
def test_original_positions_and_adaptive_budgets_survive_a_hit(name, options, tmp_path):
    spec = FAMILIES[name]
    model, processor = spec.make_model(), spec.make_processor()
    inputs = processor(images=pictures(2), text=[spec.prompt] * 2, return_tensors="pt", padding=True)
    assert_hits_match_a_miss(model, inputs, spec.tower(model), tmp_path, options)


@pytest.mark.parametrize("name", sorted(PER_CALL_FAMILIES))
@pytest.mark.parametrize("options", [{"positions": "original"}, ADAPTIVE_ORIGINAL])
def test_original_positions_and_adaptive_budgets_survive_a_per_call_hit(name, options, tmp_path):
    spec = PER_CALL_FAMILIES[name]
    model, processor = spec.make_model(), spec.make_processor()
    images = [[image] for image in pictures(2)]
    inputs = processor(images=images, text=[spec.prompt] * 2, return_tensors="pt", padding=True)
    assert_hits_match_a_miss(model, inputs, spec.tower(model), tmp_path, options)


def test_compact_entries_hold_no_positions():
    """positions='compact' never reads per-token positions, so its entries do not store them."""
    model, processor = make_llava(), make_llava_processor()
    cache = apply_with_cache(model)
    with torch.no_grad():
        vlmzip.prepare(model, processor(images=pictures(1), text=[LLAVA_PROMPT], return_tensors="pt"))
    (entry,) = cache._entries.values()
    assert entry.positions is None and entry.nbytes == entry.features.numel() * entry.features.element_size()


def test_a_stored_entry_with_positions_out_of_range_is_not_trusted():
    features = torch.zeros(3, 8)
    assert CachedVisual(features, 10, positions=torch.tensor([0, 4, 9])).is_consistent()
    assert not CachedVisual(features, 10, positions=torch.tensor([0, 4, 10])).is_consistent()
    assert not CachedVisual(features, 10, positions=torch.tensor([0, 4])).is_consistent()
    assert not CachedVisual(features, 10, positions=torch.tensor([0.0, 4.0, 5.0])).is_consistent()
