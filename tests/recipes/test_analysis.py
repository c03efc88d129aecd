import torch

from recipes.default_model.analysis import Variant, token_positions


def test_token_positions_keep_dominant_indices_and_place_contextual_at_group_mean():
    # 8 tokens: 0, 3 and 5 kept; 1, 2 merged into group 0 and 4, 6, 7 into group 1.
    groups = torch.tensor([-1, 0, 0, -1, 1, -1, 1, 1])
    kept = torch.tensor([0, 3, 5])
    assert token_positions(groups, kept, contextual=2).tolist() == [0, 3, 5, 2, 6]  # 1.5 rounds to 2


def test_first_token_with_all_tokens_equals_generate(default_model_and_processor):
    from recipes.default_model.analysis import first_token_answers
    from vlmzip.default_model import data

    model, processor = default_model_and_processor
    records = [r for r in data.test_split(num_images=2)]
    image = records[0].image
    questions = [r.question for r in records if r.scene_index == 0]
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        embeds = model.get_image_features(pixel_values=pixels).pooler_output[0]
        got = first_token_answers(model, processor.tokenizer, embeds, torch.arange(577), 577, questions)
        for question, token in zip(questions, got, strict=True):
            enc = processor(images=[image], text=[data.format_prompt(question)], return_tensors="pt")
            expected = model.generate(**enc, max_new_tokens=1, do_sample=False)[0, -1]
            assert token == int(expected)


def test_analysis_reports_placement_and_every_variant(default_model_and_processor):
    from recipes.default_model.analysis import analyse, markdown
    from vlmzip.default_model import data

    model, processor = default_model_and_processor
    variants = [Variant("vz", "visionzip"), Variant("vz-orig", "visionzip", original_positions=True)]
    result = analyse(model, processor, data.test_split(num_images=2), variants=variants)
    assert set(result["accuracy"]) == {"full", "vz", "vz-orig"}
    for value in result["placement"].values():
        assert 0.0 <= value <= 5.0
    assert 0.0 < result["placement"]["object patch share"] < 0.5
    assert "| vz-orig |" in markdown(result)
