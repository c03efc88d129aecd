"""Mistral 3 (`Mistral3ForConditionalGeneration`): Pixtral tower at native resolution, patch merger.

What differs from LLaVA:
- Pixtral encodes every image at its own size: all images' patches run as one sequence with a
  block-diagonal mask (one block per image) and 2-D rotary position embeddings. There is no [CLS]:
  a patch's score is the attention it receives from the queries of its own image in the feature
  layer (`vision_feature_layer`, default -1), computed from that layer's rotated queries and keys,
  averaged over the image's queries and summed over heads.
- The projector normalises every patch and its patch merger folds each `spatial_merge_size x
  spatial_merge_size` block of patches (`unfold`, raster order) into one token. Selection happens on
  these merged units, the tokens the language model sees: a unit's score is the sum of its patches'
  scores, its key the mean of their keys (the layer's `k_proj` output before rotary, averaged over
  heads); membership comes from the same `unfold` applied to patch indices. The method reduces the
  projector's outputs (every projector step is per unit, so this equals merging the kept units first).
- Budget: `dominant + contextual` per image (an image is one unit of the budget; `budget_scope` has
  nothing to split). An image has `rows x cols` merged tokens, so its size bounds the budget: a budget
  larger than an image's merged tokens is refused at prepare, naming the image and its limit.
- Layout of the reduced tokens: the processor writes an image as `rows` lines of `cols` `[IMG]`
  tokens separated by `[IMG_BREAK]`, the last line ending in `[IMG_END]`. The reduced tokens have no
  rows, so an image becomes `dominant + contextual` `[IMG]` tokens (dominant in raster order of the
  merged grid, then the contextual ones) followed by its one `[IMG_END]`; every `[IMG_BREAK]` of the
  image is dropped. `[IMG_END]` stays as text.
- Original positions (`positions="original"`): merged token (r, c) held placeholder `r * (cols + 1) + c`
  of its image's run (the `[IMG_BREAK]`s count); a reduced token takes the position of its anchor
  (`core.anchor_indices`), so `[IMG_END]` and the text after it keep the positions they have unreduced.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from vlmzip._validation import budget_error
from vlmzip.adapters.base import Adapter, EncodedImages, reduction_list
from vlmzip.adapters.parts import TowerAndProjector
from vlmzip.core import Reduction
from vlmzip.probe import DEFAULT_QUERY_CHUNK, ProbeOutput, TowerInfo, TowerLayout, received_attention, resolve_tower

PIXTRAL_TOWER = TowerLayout(
    layers=lambda tower: tower.transformer.layers,
    attention=lambda layer: layer.attention,
    has_cls=False,
    num_prefix_tokens=lambda config: 0,
)


class _StopAfterFeatureLayer(Exception):
    """Raised once the feature layer has run, so that later layers never do."""


def merge_units(rows: int, cols: int, merge: int) -> torch.Tensor:
    """(units, merge**2) patch indices of every merged unit of a rows x cols patch grid, in the order the
    patch merger emits them (its own `unfold` applied to patch indices)."""
    indices = torch.arange(rows * cols, dtype=torch.float64).view(1, 1, rows, cols)
    return functional.unfold(indices, kernel_size=merge, stride=merge)[0].t().round().long()


def run_offsets(units: torch.Tensor, cols: int) -> torch.Tensor:
    """The offset within an image's placeholder run of each merged unit index: `cols` [IMG] per line, then
    one [IMG_BREAK]."""
    return units // cols * (cols + 1) + units % cols


def image_grids(image_sizes: Sequence[Sequence[int]], patch_size: int) -> list[tuple[int, int]]:
    return [(int(height) // patch_size, int(width) // patch_size) for height, width in image_sizes]


def probe_pixtral_tower(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    image_sizes: Sequence[Sequence[int]],
    feature_layer: int,
    *,
    query_chunk: int | None = DEFAULT_QUERY_CHUNK,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run a Pixtral tower up to `feature_layer`: (features (patches, hidden) of all images, scores and
    keys per image). Scores (patches_i,) are the attention each patch receives from its image's queries
    (rotated queries and keys, as the attention ran), keys (patches_i, head_dim) the unrotated keys
    averaged over heads. Later layers never run; the attention itself keeps its backend."""
    info = resolve_tower(tower, PIXTRAL_TOWER)
    layer = info.layers[info.feature_layer_index(feature_layer)]
    attention = layer.attention
    captured: dict[str, Any] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            captured[name] = output

        return hook

    def keep_rotary(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        captured["position_embeddings"] = kwargs["position_embeddings"]

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        captured["features"] = output[0] if isinstance(output, (tuple, list)) else output
        raise _StopAfterFeatureLayer

    handles = [
        attention.register_forward_pre_hook(keep_rotary, with_kwargs=True),
        attention.q_proj.register_forward_hook(keep("queries")),
        attention.k_proj.register_forward_hook(keep("keys")),
        layer.register_forward_hook(stop),
    ]
    try:
        tower(pixel_values, image_sizes=image_sizes)
    except _StopAfterFeatureLayer:
        pass
    finally:
        for handle in handles:
            handle.remove()
    heads = info.num_heads
    queries = captured["queries"][0].view(-1, heads, attention.head_dim)
    keys = captured["keys"][0].view(-1, heads, attention.head_dim)
    cos, sin = captured["position_embeddings"]
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    rotated_queries, rotated_keys = rotate(queries.transpose(0, 1), keys.transpose(0, 1), cos, sin, unsqueeze_dim=0)
    rotated_queries, rotated_keys = rotated_queries.transpose(0, 1), rotated_keys.transpose(0, 1)
    sizes = [rows * cols for rows, cols in image_grids(image_sizes, info.patch_size)]
    scores, mean_keys, start = [], [], 0
    for size in sizes:
        span = slice(start, start + size)
        scores.append(
            received_attention(rotated_queries[None, span], rotated_keys[None, span], attention.scaling, query_chunk)[0]
        )
        mean_keys.append(keys[span].mean(dim=1))
        start += size
    return captured["features"][0], scores, mean_keys


class Mistral3Adapter(TowerAndProjector, Adapter):
    serves_probes = False  # the tower is probed per image by probe_pixtral_tower
    families = ("Mistral3ForConditionalGeneration",)
    image_input_keys = ("pixel_values",)
    supports_original_positions = True
    supports_adaptive = True

    # --- model parts (vision_tower, projector: TowerAndProjector) ---------------------------
    def resolve_tower_info(self) -> TowerInfo:
        return resolve_tower(self.vision_tower(), PIXTRAL_TOWER)

    @property
    def merge(self) -> int:
        return int(self.model.config.spatial_merge_size)

    def tokens_per_unit(self) -> int:
        """Merged tokens of the largest image the tower takes (`vision_config.image_size` square)."""
        side = int(self.model.config.vision_config.image_size) // self.tower_info.patch_size // self.merge
        return side * side

    def check_budget(self) -> None:
        available = self.tokens_per_unit()
        if self.config.fewest_tokens > available:
            square = self.model.config.vision_config.image_size
            where = f" (the merged tokens of the largest image this model takes, {square} px square)"
            raise budget_error(self.config, available, where)

    # --- images --------------------------------------------------------------------------
    def image_sizes(self, inputs: Mapping[str, Any]) -> list[tuple[int, int]]:
        pixel_values, sizes = inputs.get("pixel_values"), inputs.get("image_sizes")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or not pixel_values.is_floating_point():
            raise ValueError(
                "inputs['pixel_values'] must be an (images, channels, height, width) float tensor as the Mistral 3 "
                f"processor returns it, got {getattr(pixel_values, 'shape', type(pixel_values).__name__)}"
            )
        if isinstance(sizes, torch.Tensor):
            sizes = sizes.tolist()
        if not isinstance(sizes, Sequence) or len(sizes) != pixel_values.shape[0]:
            raise ValueError(
                f"inputs['image_sizes'] must hold one (height, width) pair per image ({pixel_values.shape[0]}), "
                f"got {sizes!r}"
            )
        step = self.tower_info.patch_size * self.merge
        result = []
        for index, size in enumerate(sizes):
            if not isinstance(size, Sequence) or len(size) != 2:
                raise ValueError(f"inputs['image_sizes'][{index}] must be a (height, width) pair, got {size!r}")
            height, width = int(size[0]), int(size[1])
            if not (step <= height <= pixel_values.shape[-2] and step <= width <= pixel_values.shape[-1]):
                raise ValueError(
                    f"inputs['image_sizes'][{index}] = {(height, width)} must lie within pixel_values' "
                    f"{tuple(pixel_values.shape[-2:])} and be at least {step} px (one merged token)"
                )
            result.append((height, width))
        return result

    def merged_grid_of(self, size: tuple[int, int]) -> tuple[int, int]:
        step = self.tower_info.patch_size * self.merge
        return size[0] // step, size[1] // step

    def full_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        """Per image, the run from its first `[IMG]` to the token before `[IMG_END]`: rows x (cols + 1) - 1."""
        grids = [self.merged_grid_of(size) for size in self.image_sizes(inputs)]
        return [rows * (cols + 1) - 1 for rows, cols in grids]

    def placeholder_blocks(
        self, inputs: Mapping[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor, full_counts: list[int]
    ) -> list[tuple[int, int, int]]:
        """(sample, start, length) of every image's run of `[IMG]` lines with the `[IMG_BREAK]`s between them.

        Images are matched to the text in order; each run must hold `[IMG]` where the grid has a token,
        one same non-`[IMG]` token at every line end, and be followed by a non-`[IMG]` token (`[IMG_END]`).
        """
        image_id = self.image_token_id
        is_image = (input_ids == image_id) & attention_mask.bool()
        total = int(is_image.sum())
        grids = [self.merged_grid_of(size) for size in self.image_sizes(inputs)]
        expected = sum(rows * cols for rows, cols in grids)
        if total != expected:
            raise ValueError(
                f"inputs: the text holds {total} [IMG] tokens but the {len(grids)} image(s) need {expected} "
                f"({[rows * cols for rows, cols in grids]} each); pass the processor's unmodified output"
            )
        blocks: list[tuple[int, int, int]] = []
        image = 0
        for sample in range(input_ids.shape[0]):
            ids = input_ids[sample].masked_fill(~attention_mask[sample].bool(), -1).tolist()
            position = 0
            for start in is_image[sample].nonzero().squeeze(1).tolist():
                if start < position:
                    continue
                rows, cols = grids[image]
                size = full_counts[image]
                run = ids[start : start + size]
                breaks = {run[row * (cols + 1) + cols] for row in range(rows - 1)} if len(run) == size else {None}
                line_ends = {row * (cols + 1) + cols for row in range(rows - 1)}
                images_ok = all(token == image_id for i, token in enumerate(run) if i not in line_ends)
                follows = ids[start + size] if start + size < len(ids) else image_id
                if len(run) != size or not images_ok or image_id in breaks or len(breaks) > 1 or follows == image_id:
                    raise ValueError(
                        f"inputs: image {image} needs {rows} lines of {cols} [IMG] tokens separated by [IMG_BREAK] "
                        f"and ended by [IMG_END] in sample {sample}; the text does not match the images"
                    )
                blocks.append((sample, start, size))
                position = start + size
                image += 1
        return blocks

    # --- encoding ------------------------------------------------------------------------
    @property
    def token_pixels(self) -> int:
        return self.tower_info.patch_size * self.merge

    def unit_probes(self, pixel_values: torch.Tensor, sizes: list[tuple[int, int]]) -> list[ProbeOutput]:
        """One probe per image over its merged units: projected features, pooled scores and keys."""
        tower = self.vision_tower()
        features, scores, keys = probe_pixtral_tower(tower, pixel_values.to(tower.dtype), sizes, self.feature_layer)
        projected = self.projector()(features, torch.tensor(sizes))
        probes, start = [], 0
        for index, (rows, cols) in enumerate(image_grids(sizes, self.tower_info.patch_size)):
            units = merge_units(rows, cols, self.merge).to(scores[index].device)
            count = units.shape[0]
            probes.append(
                ProbeOutput(
                    features=projected[start : start + count][None],
                    scores=scores[index][units].sum(dim=-1)[None],
                    keys=keys[index][units].mean(dim=-2)[None],
                    has_cls=False,
                    num_prefix_tokens=0,
                    grid=(rows // self.merge, cols // self.merge),
                )
            )
            start += count
        return probes

    def reduce_image(self, probe: ProbeOutput, index: int, size: tuple[int, int]) -> Reduction:
        """The one-image `probe` reduced (with an adaptive budget, at the count this image chooses)."""
        rows, cols = probe.grid
        if self.config.fewest_tokens > rows * cols:
            where = f" for image {index} (its {rows}x{cols} merged tokens at {size[0]}x{size[1]} px)"
            raise budget_error(self.config, rows * cols, where)
        (reduction,) = reduction_list(self.run_method(probe))  # one image: one row either way
        return reduction

    def reduce(
        self, pixel_values: torch.Tensor, **tower_kwargs: Any
    ) -> tuple[ProbeOutput, Reduction | list[Reduction]]:
        """Reduce whole images of one size (`pixel_values` (images, C, H, W)), as `encode` reduces each image
        (one reduction per image with an adaptive budget, whose counts differ)."""
        size = (int(pixel_values.shape[-2]), int(pixel_values.shape[-1]))
        probes = self.unit_probes(pixel_values, [size] * pixel_values.shape[0])
        reductions = [self.reduce_image(probe, index, size) for index, probe in enumerate(probes)]
        probe = ProbeOutput(
            features=torch.cat([p.features for p in probes]),
            scores=torch.cat([p.scores for p in probes]),
            keys=torch.cat([p.keys for p in probes]),
            has_cls=False,
            num_prefix_tokens=0,
            grid=probes[0].grid,
        )
        return probe, reductions if self.config.adaptive else Reduction.cat(reductions)

    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        sizes = self.image_sizes(inputs)
        probes = self.unit_probes(inputs["pixel_values"], sizes)
        reduced, slots, reductions, positions = [], [], [], []
        for index, (probe, size) in enumerate(zip(probes, sizes, strict=True)):
            reduction = self.reduce_image(probe, index, size)
            reduced.append(reduction.features[0])
            # The first `tokens` [IMG] positions of the run: line-end [IMG_BREAK]s are skipped (dropped).
            _, cols = probe.grid
            image_slots = run_offsets(torch.arange(probe.features.shape[1]), cols)
            slots.append(image_slots[: reduction.features.shape[1]])
            anchors = self.anchor_rows([reduction])
            if anchors is not None:
                positions.append(run_offsets(anchors[0], cols))
            reductions.append(reduction)
        full_counts = self.full_counts(inputs)
        original = self.config.positions == "original"
        return EncodedImages(
            reduced, full_counts, slots=slots, reductions=reductions, positions=positions if original else None
        )

    def attach_features(self, prepared: dict[str, Any], encoded: EncodedImages) -> None:
        super().attach_features(prepared, encoded)
        prepared.pop("image_sizes", None)


__all__ = ["PIXTRAL_TOWER", "Mistral3Adapter", "merge_units", "probe_pixtral_tower", "run_offsets"]
