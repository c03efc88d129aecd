"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`).

Built on the Qwen2-VL adapter (`vlmzip.adapters.qwen2_vl`): the same flattened-patch tower with
2x2 merge units and no [CLS], the same scoring (attention each merge unit's patches receive in the
scoring block, averaged over the segment's queries, summed over heads and over the unit's
patches; keys averaged over heads and patches) and the same M-RoPE handling (kept tokens keep the
3-D positions of their slots in the unreduced prompt, `vlmzip.adapters.mrope`). What differs:

- Every tower block attends over whole images (no windows), so the last block scores.
- Deepstack: the tower also returns the outputs of extra mergers applied after some intermediate
  blocks (`deepstack_visual_indexes`); the language model adds them to its first layers' hidden
  states at the visual positions. They are reduced with the *same* selection and merge groups as
  the main features: the probe concatenates them along the channels and the method reduces the
  concatenation once (every method selects on scores and keys, and merges channel by channel; for
  DivPrune, which selects on features, the selection sees the concatenated channels). They reach
  the model through its own `deepstack_features` field of `mm_encoder_outputs`, in the same token
  order as the main features.
- Video: the processor writes each temporal slice (two frames) as its own placeholder run between
  vision markers, preceded by a textual timestamp (`<1.0 seconds>`). Each slice is reduced on its
  own with the per-slice budget, and its kept tokens go back into its own run, so every timestamp
  stays in front of the tokens of its slice. `temporal_threshold` compares consecutive slices of
  a video as for Qwen2-VL.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmzip.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    families = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    family_name = "Qwen3-VL"
    deepstack = True
    video_slice_runs = True

    def encoder_output(self, features: list[torch.Tensor], deepstack: list[list[torch.Tensor]]) -> Any:
        if not self.deepstack:
            return super().encoder_output(features, deepstack)
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        return BaseModelOutputWithDeepstackFeatures(pooler_output=features, deepstack_features=deepstack)


__all__ = ["Qwen3VLAdapter"]
