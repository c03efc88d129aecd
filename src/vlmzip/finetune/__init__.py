"""Projector fine-tuning on reduced tokens (the paper's "VisionZip‡").

The language model learned to read the full token sequence; with VisionZip it reads `dominant +
contextual` tokens whose statistics differ (merged contextual tokens in particular). Training only
the multimodal projector on the reduced tokens closes much of the remaining accuracy gap while the
vision tower and the language model stay frozen.

Training runs the model's own forward with VisionZip applied (`model(**processor_inputs, labels=...)`
prepares itself and shrinks `labels` with the placeholders; the loss covers the answer tokens only),
driven by the Hugging Face `Trainer` (checkpoints, resume, progress bar, schedule, loss logging).

The tower is frozen and its reduced output does not depend on the projector, so by default the
reduction of every image is computed once before training and served in place of the tower
afterwards (`cache`). The modules, in the order a run uses them:

    options        FinetuneOptions (validated settings), FinetuneResult, file names
    examples       prompts and tokenised question-answer pairs (labels on the answer only)
    cache          the reduced-feature cache and the one place it stands in for the tower
    prepare        records read, images loaded, tokenised and reduced once; batches collated
    trainer        the model set up for projector training; the Hugging Face Trainer glue
    run_directory  the output directory, its working directory, resume and the final swap
    weights        the projector's parameters: names, copying weights in
    results        saving a finished run; load_projector
    train          finetune_projector, step by step
    command        `vlmzip finetune`
"""

from __future__ import annotations

from vlmzip.finetune.cache import ReducedFeatureCache
from vlmzip.finetune.command import register
from vlmzip.finetune.examples import Example, build_prompt, encode_image_examples
from vlmzip.finetune.options import (
    DEFAULT_PER_TYPE,
    DEFAULT_TRAIN_IMAGES,
    IMAGE_KEYS,
    LOSS_FILE,
    PARTIAL_SUFFIX,
    PROJECTOR_FILE,
    RUN_FILE,
    SCHEDULERS,
    SUMMARY_FILE,
    TOWER_BATCH,
    FinetuneOptions,
    FinetuneResult,
)
from vlmzip.finetune.results import load_projector
from vlmzip.finetune.train import finetune_projector
from vlmzip.finetune.weights import trainable_state_dict

__all__ = [
    "DEFAULT_PER_TYPE",
    "DEFAULT_TRAIN_IMAGES",
    "IMAGE_KEYS",
    "LOSS_FILE",
    "PARTIAL_SUFFIX",
    "PROJECTOR_FILE",
    "RUN_FILE",
    "SCHEDULERS",
    "SUMMARY_FILE",
    "TOWER_BATCH",
    "Example",
    "FinetuneOptions",
    "FinetuneResult",
    "ReducedFeatureCache",
    "build_prompt",
    "encode_image_examples",
    "finetune_projector",
    "load_projector",
    "register",
    "trainable_state_dict",
]
