"""VisionZip inside vLLM: a LLaVA-1.5 model class that sends the language model `dominant + contextual`
tokens per image, with vLLM's CLIP tower or transformers' DINOv2 tower (the embedded default model).

Registered with vLLM by `vlmzip.serving.register` (entry point `vllm.general_plugins`) under the
architecture name `VisionZipLlavaForConditionalGeneration`; `vlmzip export` writes model
directories that name it. Importing this module imports vLLM.

Two things differ from vLLM's own `LlavaForConditionalGeneration`:
- the processing info declares `dominant + contextual` placeholder tokens per image, so prompt
  expansion, dummy inputs and max-token profiling all agree on the reduced count;
- the image path runs the tower only up to the feature layer through `vlmzip.probe`, capturing the
  layer's queries and keys from vLLM's fused qkv projection, and reduces with `vlmzip.methods`.
- vLLM has no DINOv2 tower for LLaVA: for a `dinov2` vision config the model builds transformers'
  `Dinov2Model` as an ordinary torch module (not tensor-parallel; it is small), next to vLLM's
  projector and language model, and probes it with the library's own DINOv2 layout.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import Dinov2Model, LlavaConfig
from transformers.models.llava import LlavaProcessor
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImagePixelInputs,
    LlavaMultiModalProcessor,
    LlavaMultiModalProjector,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.parse import ImageSize

from vlmzip.config import VisionZipConfig
from vlmzip.methods import get_method
from vlmzip.probe import TowerLayout, probe_vision_tower
from vlmzip.serving.settings import absolute_feature_layer, check_architecture, resolve_config

HF_TOWERS = ("dinov2",)  # vision configs whose tower is transformers' own module inside vLLM
# transformers renamed DINOv2's attention weights between releases: checkpoint name <-> module name.
_DINOV2_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def _hf_tower_state(tower: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`weights` (tower-relative names) renamed to `tower`'s own names, in either naming of DINOv2."""
    own = set(tower.state_dict())
    state = {}
    for name, tensor in weights.items():
        if name not in own:
            for old, new in _DINOV2_RENAMES:
                for source, target in ((old, new), (new, old)):
                    if source in name and name.replace(source, target) in own:
                        name = name.replace(source, target)
        state[name] = tensor
    return state


def _uses_hf_tower(hf_config: Any) -> bool:
    return getattr(hf_config.vision_config, "model_type", None) in HF_TOWERS


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

    def get_image_size_with_most_features(self) -> ImageSize:
        if not _uses_hf_tower(self.get_hf_config()):
            return super().get_image_size_with_most_features()
        # vLLM knows no DINOv2 encoder geometry: the processor's crop is what every image becomes.
        crop = self.get_hf_processor().image_processor.crop_size
        return ImageSize(width=int(crop["width"]), height=int(crop["height"]))


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
        if _uses_hf_tower(model_config.hf_config):
            self._init_with_hf_tower(vllm_config, prefix)
        else:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visionzip_config = config
        self.visionzip_method = get_method(config.method)
        self.visionzip_feature_layer = absolute_feature_layer(self.config, config)

    def _init_with_hf_tower(self, vllm_config: VllmConfig, prefix: str) -> None:
        """vLLM LLaVA's parts (projector, language model) around transformers' tower module.

        vLLM's own constructor refuses towers it does not implement, so the parts are assembled here.
        """
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        self.config = config
        self.multimodal_config = vllm_config.model_config.multimodal_config
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_index]
        )
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = Dinov2Model(config.vision_config).eval()
            self.multi_modal_projector = LlavaMultiModalProjector(
                vision_hidden_size=config.vision_config.hidden_size,
                text_hidden_size=config.text_config.hidden_size,
                projector_hidden_act=config.projector_hidden_act,
                multimodal_projector_bias=config.multimodal_projector_bias,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "multi_modal_projector"),
            )
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config, hf_config=config.text_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def _parse_and_validate_image_input(self, **kwargs: object) -> Any:
        pixel_values = kwargs.get("pixel_values")
        if not isinstance(self.vision_tower, Dinov2Model) or pixel_values is None:
            return super()._parse_and_validate_image_input(**kwargs)
        # DINOv2 interpolates its position embeddings: the processor's crop, not the config's
        # image_size, is the resolution (checked square and a multiple of the patch size).
        sizes = {tuple(p.shape[-2:]) for p in pixel_values}
        patch = int(self.config.vision_config.patch_size)
        if len(sizes) != 1 or any(side % patch for side in next(iter(sizes))):
            raise ValueError(f"pixel_values must share one size, a multiple of the patch size {patch}; got {sizes}")
        height, width = next(iter(sizes))
        return LlavaImagePixelInputs(
            type="pixel_values", pixel_values=pixel_values, resolve_bindings={"h": height, "w": width}
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if not isinstance(self.vision_tower, Dinov2Model):
            return super().load_weights(weights)
        prefixes = ("model.vision_tower.", "vision_tower.")
        tower: dict[str, torch.Tensor] = {}

        def others() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                prefix = next((p for p in prefixes if name.startswith(p)), None)
                if prefix is None:
                    yield name, tensor
                else:
                    tower[name[len(prefix) :]] = tensor

        loaded = super().load_weights(others())
        self.vision_tower.load_state_dict(_hf_tower_state(self.vision_tower, tower), strict=True)
        return loaded | {f"vision_tower.{name}" for name, _ in self.vision_tower.named_parameters()}

    def _image_pixels_to_features(
        self, vision_tower: nn.Module, pixel_values: torch.Tensor | list[torch.Tensor]
    ) -> torch.Tensor:
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.stack(list(pixel_values))  # LLaVA-1.5 images share one resolution
        if isinstance(vision_tower, Dinov2Model):
            transformer, layout = vision_tower, None  # the library's own layout for transformers' DINOv2
        else:
            transformer, layout = vision_tower.vision_model, VLLM_CLIP_LAYOUT
        probe = probe_vision_tower(
            transformer,
            pixel_values.to(transformer.dtype),
            self.visionzip_feature_layer,
            layout=layout,
        )
        return self.visionzip_method(probe, self.visionzip_config).features
