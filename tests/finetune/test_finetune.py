"""Projector fine-tuning on reduced tokens, on a tiny random LLaVA (CLIP 336/14 tower, Llama LM)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration, TrainerCallback

import vlmzip
from conftest import IMAGE_TOKEN_ID, make_llava, make_llava_processor, random_images
from vlmzip.adapters.base import IGNORE_INDEX
from vlmzip.api import SAVED_CONFIG_NAME
from vlmzip.cli import main
from vlmzip.data import DataError
from vlmzip.finetune import (
    PARTIAL_SUFFIX,
    PROJECTOR_FILE,
    SUMMARY_FILE,
    encode_image_examples,
    finetune_projector,
    load_projector,
)
from vlmzip.loading import load_model
from vlmzip.prompts import build_prompt

CONFIG = vlmzip.VisionZipConfig(dominant=8, contextual=2)
QUESTIONS = [("how many are there ?", "two"), ("what is in the image ?", "a cat")]
# Four optimizer steps over 12 pairs, a checkpoint every two: enough to see resume and the schedule.
FAST = {"max_steps": 4, "batch_size": 4, "save_steps": 2, "logging_steps": 1, "progress": False}


def projector_state(model):
    return {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}


def write_dataset(folder, rows=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(random_images(6, size=(64, 80))):
        image.save(folder / f"{i}.png")
    if rows is None:
        rows = [{"image": f"{i}.png", "question": q, "answers": [a]} for i in range(6) for q, a in QUESTIONS]
    path = folder / "train.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    make_llava().save_pretrained(root / "base")
    make_llava_processor().save_pretrained(root / "base")
    return root, write_dataset(root / "data")


@pytest.fixture(scope="module")
def reference(workspace):
    """A model trained in place for four steps (cached features), and its output directory."""
    root, data = workspace
    model = make_llava()
    result = finetune_projector(model, data, CONFIG, root / "reference", processor=make_llava_processor(), **FAST)
    return model, result


def test_only_the_projector_changes(reference):
    trained, result = reference
    original = make_llava().state_dict()
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {f"model.multi_modal_projector.{k}" for k in projector_state(trained)}
    assert result.steps == 4 and result.examples == 12 and result.images == 6
    # The instance is handed back as it came: no VisionZip, gradients and config untouched.
    assert not vlmzip.is_applied(trained)
    assert all(p.requires_grad for p in trained.parameters())
    fresh = make_llava().config.to_dict()
    saved = {"architectures", "dtype"}  # save_pretrained records these; nothing else may change
    assert {k: v for k, v in trained.config.to_dict().items() if k not in saved} == {
        k: v for k, v in fresh.items() if k not in saved
    }


def test_output_is_a_model_directory_that_applies_its_budget(reference, images):
    trained, result = reference
    out = result.output_dir
    assert not out.with_name(out.name + PARTIAL_SUFFIX).exists()  # checkpoints are cleaned up
    assert json.loads((out / SAVED_CONFIG_NAME).read_text()) == CONFIG.to_dict()
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["steps"] == 4 and summary["config"] == CONFIG.to_dict()
    assert [e["loss"] for e in summary["log_history"] if "loss" in e]  # the loss was logged every step
    loaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    for key, value in projector_state(trained).items():
        assert torch.equal(projector_state(loaded)[key], value)
    processor = load_model(out)[1]
    vlmzip.apply(loaded)  # no config: the budget the projector was tuned for
    inputs = processor(images=images[:1], text=["USER: <image> what is in the image ? ASSISTANT:"], return_tensors="pt")
    prepared = vlmzip.prepare(loaded, inputs)
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum() == CONFIG.tokens
    vlmzip.remove(loaded)
    # Fields or a config still win over the saved budget.
    vlmzip.apply(loaded, dominant=20, contextual=4)
    assert vlmzip.api.get_state(loaded).config.tokens == 24


def test_labels_cover_the_answer_only(fresh_llava, images):
    processor = make_llava_processor()
    pixels, pairs = encode_image_examples(processor, images[0], QUESTIONS)
    assert pixels.shape == (1, 3, 336, 336)
    for (ids, labels), (question, answer) in zip(pairs, QUESTIONS, strict=True):
        answer_ids = labels[labels != IGNORE_INDEX]
        assert processor.tokenizer.convert_ids_to_tokens(answer_ids.tolist()) == [*answer.split(), "</s>"]
        # The prompt part is exactly what the processor makes of this image and prompt.
        prompt = build_prompt(processor, question)  # what vlmzip eval asks with
        expected = processor(images=images[:1], text=[prompt], return_tensors="pt")["input_ids"][0]
        assert torch.equal(ids, torch.cat([expected, answer_ids]))
        assert torch.equal(labels[: expected.numel()], torch.full_like(expected, IGNORE_INDEX))
    # A processor that cannot say its image token is asked for every prompt: same result.
    processor.image_token_id = None
    _, again = encode_image_examples(processor, images[0], QUESTIONS)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(again, pairs, strict=True))
    # Through VisionZip the placeholders shrink and the loss is the mean over answer tokens only.
    vlmzip.apply(fresh_llava, CONFIG)
    ids, labels = pairs[1]
    with torch.no_grad():
        out = fresh_llava(input_ids=ids[None], labels=labels[None], pixel_values=pixels)
    prepared = vlmzip.prepare(fresh_llava, {"input_ids": ids[None], "labels": labels[None], "pixel_values": pixels})
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum() == CONFIG.tokens
    assert torch.equal(prepared["labels"][prepared["labels"] != IGNORE_INDEX], labels[labels != IGNORE_INDEX])
    targets = prepared["labels"][0, 1:]
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1][targets != IGNORE_INDEX], targets[targets != -100])
    torch.testing.assert_close(out.loss, expected)


def test_tower_every_step_trains_the_same_projector(workspace, reference):
    root, data = workspace
    trained, _ = reference
    result = finetune_projector(str(root / "base"), data, CONFIG, root / "no-cache", cache_features=False, **FAST)
    assert result.steps == 4
    loaded = LlavaForConditionalGeneration.from_pretrained(result.output_dir)
    for key, value in projector_state(trained).items():
        torch.testing.assert_close(projector_state(loaded)[key], value, rtol=1e-5, atol=1e-6)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_interrupted_run_keeps_the_old_output_and_resumes(workspace, reference):
    root, data = workspace
    trained, _ = reference
    out = root / "resumed"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    base = str(root / "base")
    with pytest.raises(KeyboardInterrupt):
        finetune_projector(base, data, CONFIG, out, overwrite=True, callbacks=[StopAt(3)], **FAST)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    work = out.with_name(out.name + PARTIAL_SUFFIX)
    assert (work / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(ValueError, match="different settings.*batch_size"):
        finetune_projector(base, data, CONFIG, out, overwrite=True, resume=True, **{**FAST, "batch_size": 3})
    result = finetune_projector(base, data, CONFIG, out, overwrite=True, resume=True, **FAST)
    assert result.steps == 4 and not work.exists() and not (out / "keep.txt").exists()
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    for key, value in projector_state(trained).items():
        torch.testing.assert_close(projector_state(loaded)[key], value, rtol=1e-5, atol=1e-6)
    # The recorded loss is the mean over all four steps, not over the two run after the resume.
    uninterrupted = finetune_projector(base, data, CONFIG, root / "uninterrupted", **FAST)
    assert uninterrupted.train_loss == pytest.approx(uninterrupted.log_history[-1]["train_loss"], rel=1e-6)
    assert result.train_loss == pytest.approx(uninterrupted.train_loss, rel=1e-5)
    assert json.loads((out / SUMMARY_FILE).read_text())["train_loss"] == pytest.approx(uninterrupted.train_loss, 1e-5)


def test_adapter_only_saves_the_projector_and_loads_on_the_base(workspace):
    root, data = workspace
    model = make_llava()
    out = root / "adapter"
    finetune_projector(
        model, data, CONFIG, out, processor=make_llava_processor(), adapter_only=True, **{**FAST, "max_steps": 1}
    )
    assert sorted(p.name for p in out.iterdir()) == sorted([PROJECTOR_FILE, SAVED_CONFIG_NAME, SUMMARY_FILE])
    assert (out / PROJECTOR_FILE).stat().st_size < 100_000
    base = make_llava()
    assert load_projector(base, out) == CONFIG
    assert torch.equal(
        torch.cat([v.flatten() for v in projector_state(base).values()]),
        torch.cat([v.flatten() for v in projector_state(model).values()]),
    )
    with pytest.raises(FileNotFoundError, match="projector weights not found"):
        load_projector(base, root)
    save_file({"model.multi_modal_projector.linear_1.weight": torch.zeros(2, 2)}, str(root / "wrong.safetensors"))
    with pytest.raises(ValueError, match="do not match this model"):
        load_projector(base, root / "wrong.safetensors")


def test_skips_bad_rows_and_images_and_reports_line_numbers(workspace):
    root, _ = workspace
    folder = root / "bad-data"
    rows = [
        {"image": "0.png", "question": "how many are there ?", "answers": ["two"]},
        "{not json",
        {"image": "broken.png", "question": "how many are there ?", "answers": ["two"]},
        {"image": "1.png", "question": "what is in the image ?", "answers": ["a cat"]},
        {"image": "missing.png", "question": "how many are there ?", "answers": ["two"]},
    ]
    data = write_dataset(folder, rows)
    (folder / "broken.png").write_text("not an image")
    base = str(root / "base")
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        finetune_projector(base, data, CONFIG, root / "bad-out", **FAST)
    skipped = finetune_projector(base, data, CONFIG, root / "bad-out", on_error="skip", **{**FAST, "max_steps": 1})
    assert skipped.examples == 2
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in skipped.problems] == ["2", "5", "3"]
    assert "not a readable image" in skipped.problems[2]
    rows.pop(4)
    rows.pop(1)
    with pytest.raises(DataError, match=r"train.jsonl:2: not a readable image"):
        finetune_projector(base, write_dataset(folder, rows), CONFIG, root / "bad-out-2", **FAST)
    assert not (root / "bad-out-2").exists() and not (root / f"bad-out-2{PARTIAL_SUFFIX}").exists()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"learning_rate": "fast"}, TypeError, "learning_rate"),
        ({"warmup_ratio": 1.0}, ValueError, "warmup_ratio"),
        ({"epochs": 0}, ValueError, "epochs"),
        ({"scheduler": "cyclic"}, ValueError, "scheduler"),
        ({"on_error": "ignore"}, ValueError, "on_error"),
        ({"prompt_template": "no placeholder"}, ValueError, "prompt_template"),
        ({"prompt_template": "Q: {question} A:"}, ValueError, "image token <image>"),
        ({"config": {"dominant": 8}}, TypeError, "config must be a VisionZipConfig"),
        ({"config": vlmzip.VisionZipConfig(dominant=570, contextual=10)}, ValueError, "must be <= 576"),
        ({"data": 42}, TypeError, "data must be"),
        ({"model": 42}, TypeError, "model must be"),
        ({"output_dir": None}, TypeError, "output_dir"),
    ],
)
def test_bad_arguments(workspace, kwargs, error, match):
    root, data = workspace
    arguments = {"model": str(root / "base"), "data": data, "config": CONFIG, "output_dir": root / "never", **kwargs}
    with pytest.raises(error, match=match):
        finetune_projector(**arguments, max_steps=1, progress=False)
    assert not (root / "never").exists() and not (root / f"never{PARTIAL_SUFFIX}").exists()


def test_existing_output_or_interrupted_run_is_refused(workspace, reference):
    root, data = workspace
    with pytest.raises(FileExistsError, match="output directory exists.*--overwrite"):
        finetune_projector(str(root / "base"), data, CONFIG, reference[1].output_dir, max_steps=1)
    (root / f"stale{PARTIAL_SUFFIX}").mkdir()
    with pytest.raises(FileExistsError, match="interrupted run.*--resume"):
        finetune_projector(str(root / "base"), data, CONFIG, root / "stale", max_steps=1)


def test_corrupt_saved_config_is_an_error(tmp_path):
    model = make_llava()
    model.save_pretrained(tmp_path)
    (tmp_path / SAVED_CONFIG_NAME).write_text('{"dominant": "many"}')
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=SAVED_CONFIG_NAME):
        vlmzip.apply(loaded)


def test_cli(workspace, capsys):
    root, data = workspace
    out = root / "cli"
    args = ["finetune", "--model", str(root / "base"), "--data", str(data), "-o", str(out), "--no-progress"]
    assert main([*args, "--tokens", "10", "--max-steps", "1", "--batch-size", "4"]) == 0
    assert "fine-tuned the projector for 8 + 2 tokens on 12 examples" in capsys.readouterr().out
    assert json.loads((out / SAVED_CONFIG_NAME).read_text())["dominant"] == 8
    assert main([*args, "--tokens", "10"]) == 2
    assert "output directory exists" in capsys.readouterr().err
    assert main([*args, "--tokens", "10", "--dominant", "3", "--overwrite"]) == 2
    assert "either --tokens or --dominant" in capsys.readouterr().err
    assert main(["finetune", "--model", str(root / "base"), "-o", str(out), "--overwrite"]) == 2
    assert "--data is required with --model" in capsys.readouterr().err
    assert main(["finetune", "--model", str(root / "typo"), "-o", str(out), "--overwrite"]) == 2
    assert "--model: model directory not found: " + str(root / "typo") in capsys.readouterr().err
    assert main([*args, "--dominant", "40", "--overwrite"]) == 2
    assert "--dominant and --contextual must be given together" in capsys.readouterr().err
    assert main([*args, "--dominant", "600", "--contextual", "0", "--overwrite"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vlmzip finetune: error: dominant + contextual must be <= 576")
    assert "Traceback" not in err


def test_missing_accelerate_is_a_clear_error(workspace, monkeypatch, capsys):
    import transformers.utils

    root, data = workspace
    monkeypatch.setattr(transformers.utils, "is_accelerate_available", lambda *args: False)
    with pytest.raises(ImportError, match=r"pip install 'vlmzip\[finetune\]'"):
        finetune_projector(str(root / "base"), data, CONFIG, root / "never")
    assert main(["finetune", "--data", str(data), "-o", str(root / "never")]) == 2
    assert "needs the accelerate package" in capsys.readouterr().err


def test_output_over_an_input_is_refused_even_with_overwrite(workspace, tmp_path, capsys):
    """An output equal to, inside or containing the model, the data or an image would destroy it."""
    root, data = workspace
    base = root / "base"
    before = sorted((p.name, p.stat().st_size) for p in base.iterdir())
    (tmp_path / "link").symlink_to(base)
    cases = [
        (base, {}),  # the model itself
        (tmp_path / "link", {}),  # the model under another name
        (base / "adapter", {"adapter_only": True}),
        (root, {}),  # contains the model and the data
        (data, {}),  # the data file
        (data.parent / "0.png", {}),  # an image the data names
    ]
    for output, extra in cases:
        for overwrite in (False, True):
            with pytest.raises(ValueError, match=r"-o/--output .* (is|is inside|contains) the input .*even with"):
                finetune_projector(str(base), data, CONFIG, output, overwrite=overwrite, max_steps=1, **extra)
    # The working directory beside the output (OUTPUT.partial) would be wiped: it may not be an input either.
    (tmp_path / f"model{PARTIAL_SUFFIX}").symlink_to(base)
    with pytest.raises(ValueError, match=r"working directory .* is the input --model"):
        finetune_projector(str(tmp_path / f"model{PARTIAL_SUFFIX}"), data, CONFIG, tmp_path / "model", max_steps=1)
    assert sorted((p.name, p.stat().st_size) for p in base.iterdir()) == before
    args = ["finetune", "--model", str(base), "--data", str(data), "-o", str(base), "--overwrite", "--adapter-only"]
    assert main([*args, "--no-progress", "--max-steps", "1"]) == 2
    assert "is the input --model" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_size) for p in base.iterdir()) == before


def test_original_positions_reach_the_language_model_during_training(workspace):
    root, data = workspace
    model, seen = make_llava(), []

    def record(module, args, kwargs):
        seen.append(kwargs.get("position_ids"))

    handle = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    config = CONFIG.replace(positions="original")
    try:
        result = finetune_projector(model, data, config, root / "original", processor=make_llava_processor(), **FAST)
    finally:
        handle.remove()
    assert seen and all(positions is not None for positions in seen)
    # Text after the image continues after all 576 placeholders, although only 10 tokens reached the model.
    assert all(int(positions.max()) > 576 for positions in seen)
    assert json.loads((result.output_dir / SAVED_CONFIG_NAME).read_text())["positions"] == "original"


def test_an_adaptive_budget_is_refused(workspace, tmp_path):
    root, data = workspace
    config = CONFIG.replace(attention_mass=0.5)
    with pytest.raises(ValueError, match="projector fine-tuning takes a fixed budget"):
        finetune_projector(str(root / "base"), data, config, tmp_path / "never", max_steps=1, progress=False)


def test_command_line_defaults_are_the_option_defaults_and_every_option_is_settable():
    from dataclasses import asdict

    from vlmzip.cli import build_parser
    from vlmzip.finetune.command import options_from_args
    from vlmzip.finetune.options import FinetuneOptions

    parser = build_parser()
    assert options_from_args(parser.parse_args(["finetune", "-o", "out", "--tokens", "64"])) == asdict(
        FinetuneOptions()
    )
    args = parser.parse_args(
        ["finetune", "-o", "out", "--tokens", "64", "--lr", "0.01", "--prompt", "Q: {question} <image>", "--no-cache"]
    )
    options = FinetuneOptions(**options_from_args(args))
    assert (options.learning_rate, options.prompt_template, options.cache_features) == (
        0.01,
        "Q: {question} <image>",
        False,
    )
