"""The Hugging Face `Trainer` glue: the model set up for projector training, the arguments, the trainer itself."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmzip.api import apply, get_state, remove
from vlmzip.config import VisionZipConfig
from vlmzip.finetune.cache import ReducedFeatureCache
from vlmzip.finetune.options import IMAGE_KEYS, LOSS_FILE, FinetuneOptions
from vlmzip.finetune.weights import load_into, projector_of, trainable_state_dict


@contextmanager
def projector_training(model: nn.Module, config: VisionZipConfig) -> Iterator[tuple[Any, nn.Module]]:
    """VisionZip applied and everything but the projector frozen; the model is handed back as it came."""
    apply(model, config)  # budgets the model cannot take fail here, before anything is written
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    use_cache = model.config.__dict__.get("use_cache", _UNSET)  # the Trainer sets it
    try:
        adapter = get_state(model).adapter
        if tuple(adapter.image_input_keys) != ("pixel_values",):
            raise ValueError(
                f"model: projector fine-tuning supports families with one pixel tensor per image (LLaVA-1.5); "
                f"{type(model).__name__} takes {list(adapter.image_input_keys)}"
            )
        projector = projector_of(adapter)
        model.requires_grad_(False)
        projector.requires_grad_(True)
        yield adapter, projector
    finally:
        remove(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])
        if use_cache is _UNSET:
            model.config.__dict__.pop("use_cache", None)
        else:
            model.config.use_cache = use_cache
        model.train(was_training)


_UNSET = object()


def training_arguments(options: FinetuneOptions, checkpoints: Path, progress: bool) -> Any:
    """The Trainer's `TrainingArguments` for `options`, checkpointing into `checkpoints`."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=options.batch_size,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps if options.max_steps is not None else -1,
        learning_rate=options.learning_rate,
        lr_scheduler_type=options.scheduler,
        warmup_steps=options.warmup_ratio,  # below 1: a fraction of the total steps
        weight_decay=options.weight_decay,
        optim="adamw_torch",
        logging_steps=options.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=1,  # resume needs the latest only
        seed=options.seed,
        data_seed=options.seed,
        remove_unused_columns=False,  # the collator's batches are exactly what the model takes
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=not progress,
        report_to="none",
    )


def require_trainer() -> None:
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise ImportError("projector fine-tuning needs the accelerate package: pip install 'vlmzip[finetune]'")


def make_trainer(**kwargs: Any) -> Any:
    """A `Trainer` that trains the projector on (optionally cached) reduced tokens."""
    from safetensors.torch import load_file, save_file
    from transformers import Trainer
    from transformers.utils import SAFE_WEIGHTS_NAME

    class ProjectorTrainer(Trainer):
        def __init__(self, *args: Any, projector: nn.Module, cache: ReducedFeatureCache | None, **rest: Any) -> None:
            super().__init__(*args, **rest)
            self.projector = projector
            self.cache = cache
            self.loss_sum = 0.0  # summed like the Trainer's own running loss, over every step (resumed ones too)

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = super().training_step(*args, **kwargs)
            self.loss_sum += float(loss)
            return loss

        def mean_loss(self) -> float:
            """The mean training loss over all steps of the run, those before a resume included."""
            return self.loss_sum / max(self.state.global_step, 1)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            keys = inputs.pop(IMAGE_KEYS, None)
            # The frozen parts run as at inference (no dropout): only the projector is in training mode.
            self.model.eval()
            self.projector.train()
            serving = self.cache.serving(keys) if self.cache is not None and keys is not None else nullcontext()
            with serving:
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            # Checkpoints hold the trained weights only; the frozen rest is the base model's.
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            save_file(trainable_state_dict(self.model), os.path.join(output_dir, SAFE_WEIGHTS_NAME))
            record = {"steps": self.state.global_step, "loss_sum": self.loss_sum}
            Path(output_dir, LOSS_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            file = Path(resume_from_checkpoint) / SAFE_WEIGHTS_NAME
            if not file.is_file():
                raise ValueError(f"cannot resume: no weights in checkpoint {resume_from_checkpoint}")
            expected = [name for name, p in self.model.named_parameters() if p.requires_grad]
            load_into(self.model, load_file(str(file)), expected, file)
            loss_file = Path(resume_from_checkpoint) / LOSS_FILE
            if not loss_file.is_file():
                raise ValueError(f"cannot resume: no {LOSS_FILE} in checkpoint {resume_from_checkpoint}")
            self.loss_sum = float(json.loads(loss_file.read_text(encoding="utf-8"))["loss_sum"])

    return ProjectorTrainer(**kwargs)
