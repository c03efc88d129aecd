"""`adapter.probes_from(source)`: prepare() reduces from given probe outputs, the tower does not run;
and the batch operations of ProbeOutput and Reduction it builds on (cat, row indexing, split)."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import make_llava, make_llava_processor, make_qwen2_vl, make_qwen_processor, random_images
from families import make_gemma3, make_gemma3_processor, make_llava_next, make_llava_next_processor
from vlmzip.adapters import adapter_class_for
from vlmzip.core import Reduction
from vlmzip.methods import get_method
from vlmzip.probe import ProbeOutput, probe_vision_tower

FAMILIES = {
    "llava": (make_llava, make_llava_processor, "<image> what is it ?"),
    "llava-next": (make_llava_next, make_llava_next_processor, "<image> what is it ?"),
    "gemma3": (make_gemma3, make_gemma3_processor, "<start_of_image> what is it ?"),
}


def assert_same_inputs(expected: dict, served: dict) -> None:
    assert expected.keys() == served.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, served[key]), key
    features = expected["mm_encoder_outputs"]["image"].pooler_output
    for want, got in zip(features, served["mm_encoder_outputs"]["image"].pooler_output, strict=True):
        assert torch.allclose(want, got, atol=1e-6)


class TowerCalls:
    """Counts the vision tower's forward calls."""

    def __init__(self, tower: torch.nn.Module) -> None:
        self.count = 0
        self.handle = tower.register_forward_pre_hook(self._seen)

    def _seen(self, module, args) -> None:
        self.count += 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prepare_on_cached_probes_equals_the_tower(family):
    make_model, make_processor, prompt = FAMILIES[family]
    model, processor = make_model(), make_processor()
    adapter = adapter_class_for(model)(model, vlmzip.VisionZipConfig(dominant=5, contextual=2), processor)
    images = random_images(2, seed=4)
    batches = [processor(images=[image], text=[prompt], return_tensors="pt") for image in images]
    kept: list[ProbeOutput] = []

    def keep(pixel_values, **kwargs):
        probe = probe_vision_tower(adapter.vision_tower(), pixel_values, adapter.feature_layer, **kwargs)
        kept.append(probe)
        return probe

    with torch.no_grad():
        expected = [adapter.prepare(inputs, cache=None) for inputs in batches]
        with adapter.probes_from(keep):  # a callable source: here the tower itself, its probes kept
            for want, got in zip(expected, [adapter.prepare(inputs, cache=None) for inputs in batches], strict=True):
                assert_same_inputs(want, got)
        calls = TowerCalls(adapter.vision_tower())
        try:
            with adapter.probes_from(ProbeOutput.cat(kept)):  # every image's probe rows, served in order
                served = [adapter.prepare(inputs, cache=None) for inputs in batches]
        finally:
            calls.handle.remove()
        assert calls.count == 0  # the tower never ran
        for want, got in zip(expected, served, strict=True):
            assert_same_inputs(want, got)
        with pytest.raises(ValueError, match="the source holds"):
            with adapter.probes_from(ProbeOutput.cat(kept)):
                [adapter.prepare(inputs, cache=None) for inputs in [*batches, batches[0]]]  # one image too many


def test_probes_from_refusals():
    model, processor = make_llava(), make_llava_processor()
    adapter = adapter_class_for(model)(model, vlmzip.VisionZipConfig(dominant=5, contextual=2), processor)
    inputs = processor(images=random_images(2), text=["<image> a", "<image> b"], return_tensors="pt", padding=True)
    with torch.no_grad():
        probe = adapter.probe_tower(inputs["pixel_values"])
        with adapter.probes_from(probe[0]), pytest.raises(ValueError, match="holds 1 rows"):
            adapter.prepare(inputs, cache=None)  # two images, one probe row
        with adapter.probes_from(probe), pytest.raises(ValueError, match="already active"):
            with adapter.probes_from(probe):
                pass
        with adapter.probes_from(lambda pixels: probe[0]), pytest.raises(ValueError, match="ProbeOutput of 2 rows"):
            adapter.prepare(inputs, cache=None)
        short = ProbeOutput(probe.features[:, 1:], probe.scores[:, 1:], probe.keys[:, 1:], True, 1, probe.grid)
        with adapter.probes_from(short), pytest.raises(ValueError, match="tokens per unit"):
            adapter.prepare(inputs, cache=None)
    with pytest.raises(TypeError, match="source must be"):
        with adapter.probes_from("probes"):
            pass
    qwen = make_qwen2_vl()
    qwen_adapter = adapter_class_for(qwen)(
        qwen, vlmzip.VisionZipConfig(dominant=3, contextual=1), make_qwen_processor()
    )
    with pytest.raises(ValueError, match="not supported"):
        with qwen_adapter.probes_from(probe):
            pass


def random_probe(rows: int, tokens: int = 5, seed: int = 0) -> ProbeOutput:
    generator = torch.Generator().manual_seed(seed)
    return ProbeOutput(
        features=torch.randn(rows, tokens, 4, generator=generator),
        scores=torch.rand(rows, tokens - 1, generator=generator),
        keys=torch.randn(rows, tokens, 3, generator=generator),
        has_cls=True,
        num_prefix_tokens=1,
        grid=(2, 2),
    )


def test_probe_cat_and_rows():
    first, second = random_probe(2), random_probe(3, seed=1)
    both = ProbeOutput.cat([first, second])
    assert both.features.shape[0] == 5 and both.grid == (2, 2) and both.has_cls
    assert torch.equal(both[2:].keys, second.keys)
    assert torch.equal(both[1].features, first.features[1:2])  # an int keeps the batch dimension
    assert torch.equal(both[-1].scores, second.scores[2:3])
    assert torch.equal(both[[4, 0]].features, torch.stack([second.features[2], first.features[0]]))
    assert torch.equal(both[torch.tensor([True, False, False, False, True])].keys, both[[0, 4]].keys)
    with pytest.raises(IndexError, match="out of range"):
        both[5]
    with pytest.raises(TypeError, match="bool"):
        both[True]
    with pytest.raises(ValueError, match="non-empty"):
        ProbeOutput.cat([])
    with pytest.raises(TypeError, match="probes must be a non-empty sequence of ProbeOutput, got int"):
        ProbeOutput.cat(3)
    other = ProbeOutput(first.features, first.scores, first.keys, False, 0, (2, 2))
    with pytest.raises(ValueError, match="must share"):
        ProbeOutput.cat([first, other])


def test_reduction_cat_rows_and_split():
    probe = random_probe(3)
    reduction = get_method("visionzip")(probe, vlmzip.VisionZipConfig(dominant=3, contextual=1))
    rows = reduction.split()
    assert len(rows) == 3 and all(row.features.shape[0] == 1 for row in rows)
    assert rows[1].features.data_ptr() == reduction.features[1:2].data_ptr()  # views, no copies
    again = Reduction.cat(rows)
    for name in ("features", "kept_indices", "groups", "scores"):
        assert torch.equal(getattr(again, name), getattr(reduction, name))
    picked = reduction[[2, 0]]
    assert torch.equal(picked.kept_indices, reduction.kept_indices[[2, 0]])
    no_scores = Reduction(reduction.features, reduction.kept_indices, reduction.groups)
    assert no_scores[0].scores is None and Reduction.cat([no_scores, reduction]).scores is None
    with pytest.raises(ValueError, match="non-empty"):
        Reduction.cat([])
    with pytest.raises(TypeError, match="reductions must be a non-empty sequence of Reduction, got NoneType"):
        Reduction.cat(None)
    wider = get_method("visionzip")(probe, vlmzip.VisionZipConfig(dominant=4, contextual=1))
    with pytest.raises(ValueError, match=r"reductions must agree in \(tokens, kept, grouped\) counts"):
        Reduction.cat([reduction, wider])
    # A list of bools is a mask over the rows, as a bool tensor is (not the indices 1 and 0).
    assert torch.equal(reduction[[False, True, True]].groups, reduction.groups[1:])
    for bad in ("0", 1.5, None, [0.5], [True, 0], torch.tensor([0.5])):
        with pytest.raises(TypeError, match="rows must be an int, a slice, or a sequence / tensor of integer"):
            reduction[bad]


def test_watching_method_brackets_each_method_call_and_refuses_a_non_callable():
    model, processor = make_llava(), make_llava_processor()
    adapter = adapter_class_for(model)(model, vlmzip.VisionZipConfig(dominant=8, contextual=2))
    pixels = processor(images=random_images(2), text=["<image>"] * 2, return_tensors="pt")["pixel_values"]
    stages: list[str] = []
    with torch.no_grad(), adapter.watching_method(stages.append):
        adapter.reduce(pixels)
    assert stages == ["start", "end"]  # one batched call for a fixed budget
    with torch.no_grad():
        adapter.reduce(pixels)
    assert stages == ["start", "end"]  # nothing heard outside the context
    with pytest.raises(TypeError, match="listener must be callable"), adapter.watching_method("not callable"):
        pass
