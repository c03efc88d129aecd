"""Qwen3.5 (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`; `qwen3_5` in the auto mapping).

Qwen3.5 is natively multimodal: its vision side is Qwen3-VL's tower (patch 16, learned position
embeddings resampled to each grid plus 2-D rotary, full attention in every block, 2x2 merger) and
its processor is Qwen3-VL's (a video is one placeholder run per temporal slice, each after a
textual timestamp). What differs from Qwen3-VL, for VisionZip:

- No deepstack: the tower returns only the merger output, so only the main features are reduced.
- The language model is hybrid: most layers are Gated DeltaNet (linear attention with a causal
  convolution and a recurrent state), every few layers one full-attention layer (`layer_types`),
  with partial rotary embeddings (M-RoPE on a fraction of each head). None of this changes how the
  visual tokens are chosen; the reduced sequence goes through the model's own forward, so the
  recurrent layers simply see fewer tokens. Positions are the same M-RoPE ids as for Qwen3-VL.

Everything else (scoring at the last block, merge units, per-slice video runs, M-RoPE positions
kept at the kept slots) is the Qwen3-VL adapter's.
"""

from __future__ import annotations

from vlmzip.adapters.qwen3_vl import Qwen3VLAdapter


class Qwen3_5Adapter(Qwen3VLAdapter):  # noqa: N801 - the model family's own spelling
    families = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")
    family_name = "Qwen3.5"
    deepstack = False


__all__ = ["Qwen3_5Adapter"]
