"""VisionZip inside vLLM: a LLaVA-1.5 model class that sends the language model `dominant + contextual`
tokens per image.

Registered with vLLM by `vlmzip.serving.register` (entry point `vllm.general_plugins`) under the
architecture name `VisionZipLlavaForConditionalGeneration`; `vlmzip export` writes model
directories that name it. Importing this module imports vLLM.

Two things differ from vLLM's own `LlavaForConditionalGeneration`:
- the processing info declares `dominant + contextual` placeholder tokens per image, so prompt
  expansion, dummy inputs and max-token profiling all agree on the reduced count;
- the image path runs the tower only up to the feature layer through `vlmzip.probe`, capturing the
  layer's queries and keys from vLLM's fused qkv projection, and reduces with `vlmzip.methods`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import LlavaConfig
from transformers.models.llava import LlavaProcessor
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vlmzip.config import VisionZipConfig
from vlmzip.methods import get_method
from vlmzip.probe import TowerLayout, probe_vision_tower
from vlmzip.serving.settings import absolute_feature_layer, check_architecture, resolve_config


def _capture_fused_qkv(attention: nn.Module, captured: dict[str, torch.Tensor]) -> list[RemovableHandle]:
    """Queries and keys from vLLM's `qkv_proj` output ([q | k | v] per tensor-parallel rank).

    Under tensor parallelism each rank holds its own heads; they are gathered so that the [CLS] row
    is summed and the keys averaged over all heads, as on one device.
    """

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        qkv = output[0] if isinstance(output, tuple) else output
        queries, keys, _ = qkv.chunk(3, dim=-1)
        if getattr(attention, "tp_size", 1) > 1:
            queries = tensor_model_parallel_all_gather(queries.contiguous())
            keys = tensor_model_parallel_all_gather(keys.contiguous())
        captured["queries"], captured["keys"] = queries, keys

    return [attention.qkv_proj.register_forward_hook(hook)]


# vLLM's CLIPVisionTransformer (`vision_tower.vision_model`): same module tree as transformers' CLIP
# except for the fused qkv projection; its class name collides with transformers', so the layout is
# passed explicitly rather than looked up by name.
VLLM_CLIP_LAYOUT = TowerLayout(
    layers=lambda tower: tower.encoder.layers,
    attention=lambda layer: layer.self_attn,
    has_cls=True,
    num_prefix_tokens=lambda config: 1,
    capture_qk=_capture_fused_qkv,
)


class _BudgetedLlavaProcessor(LlavaProcessor):
    """transformers' LlavaProcessor expanding each `<image>` into the reduced token count.

    vLLM expands placeholders itself from `get_num_image_tokens`; this keeps the HF processor's own
    expansion (used when it is called with text) and its token counting consistent with that.
    """

    visionzip_tokens: int

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.image_token * self.visionzip_tokens

    def _get_num_multimodal_tokens(self, image_sizes: Any = None, **kwargs: Any) -> Any:
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if image_sizes is not None:
            data["num_image_tokens"] = [self.visionzip_tokens] * len(image_sizes)
        return data


class VisionZipLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA processing info whose images take `dominant + contextual` placeholder tokens each."""

    def visionzip_config(self) -> VisionZipConfig:
        # Resolved once per info object; invalid configs raise here with the settings' message.
        config = self.__dict__.get("_visionzip_config")
        if config is None:
            config = resolve_config(self.ctx.model_config.model, self.get_hf_config())
            self.__dict__["_visionzip_config"] = config
        return config

    def get_hf_config(self) -> LlavaConfig:
        check_architecture(self.ctx.model_config.hf_config)  # before vLLM's own, less telling, type check
        return super().get_hf_config()

    def get_hf_processor(self, **kwargs: object) -> LlavaProcessor:
        processor = copy.copy(super().get_hf_processor(**kwargs))  # vLLM caches the original: leave it alone
        processor.__class__ = _BudgetedLlavaProcessor
        processor.visionzip_tokens = self.visionzip_config().tokens
        return processor

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        return self.visionzip_config().tokens


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor,
    info=VisionZipLlavaProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class VisionZipLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with VisionZip in the image path: `dominant + contextual` tokens per image."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        model_config = vllm_config.model_config
        # Checked before any weight is allocated: a bad budget or model fails at load, not at a request.
        config = resolve_config(model_config.model, model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visionzip_config = config
        self.visionzip_method = get_method(config.method)
        self.visionzip_feature_layer = absolute_feature_layer(self.config, config)

    def _image_pixels_to_features(
        self, vision_tower: nn.Module, pixel_values: torch.Tensor | list[torch.Tensor]
    ) -> torch.Tensor:
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))  # LLaVA-1.5 images share one resolution
        transformer = vision_tower.vision_model
        probe = probe_vision_tower(
            transformer,
            pixel_values.to(transformer.dtype),
            self.visionzip_feature_layer,
            layout=VLLM_CLIP_LAYOUT,
        )
        return self.visionzip_method(probe, self.visionzip_config).features
