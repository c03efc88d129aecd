"""The default model's trainable form: scene codes, the vision-language model around cached features, packing.

Used by the training recipe (`recipes.default_model.train`); only the projector and language model it trains
are shipped, as stock transformers weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from recipes.default_model.features import FEATURE_DIM
from vlmzip.default_model import build, data


class SceneCoder(nn.Module):
    """Training-only "scene codes": exact image tokens built from a scene's ground truth.

    Each patch token is the sum of learned embeddings of its class (background or shape x size), whether it
    holds an object's centre, its row and its column; [CLS] has a token of its own. The language model first
    learns to read these on unlimited fresh scenes (no tower needed), while the projector learns to map the
    real tower features onto them.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(hidden) * 0.5)
        self.kind = nn.Embedding(data.NUM_PATCH_CLASSES, hidden)
        self.centre = nn.Embedding(2, hidden)
        self.row = nn.Embedding(data.GRID, hidden)
        self.col = nn.Embedding(data.GRID, hidden)
        for emb in (self.kind, self.centre, self.row, self.col):
            nn.init.normal_(emb.weight, std=0.5)
        grid = torch.arange(data.GRID * data.GRID)
        self.register_buffer("rows", grid // data.GRID, persistent=False)
        self.register_buffer("cols", grid % data.GRID, persistent=False)

    def forward(self, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """(B, 576) patch classes and centre flags -> (B, 577, hidden) tokens, [CLS] first."""
        patches = self.kind(labels) + self.centre(centres) + self.row(self.rows) + self.col(self.cols)
        cls = self.cls.expand(labels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1)


# Referent head outputs: how many objects a noun denotes, and for a single one its shape, size, row, column.
REFERENT_SPLITS = (data.MAX_OBJECTS + 1, len(data.SHAPES), len(data.SIZES), data.GRID, data.GRID)


class TrainableVLM(nn.Module):
    """Projector + Llama LM over cached tower features; maps 1:1 onto ``LlavaForConditionalGeneration``.

    The projector input is standardised with fixed statistics during training; the standardisation is
    folded into ``linear_1`` on export, so the shipped model reads raw tower features. The scene coder and
    the two heads on the question's nouns are training-only and never exported.
    """

    def __init__(self, config, mean: torch.Tensor, std: torch.Tensor, image_head: bool = False) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        text = config.text_config
        self.register_buffer("feat_mean", mean.clone())
        self.register_buffer("feat_std", std.clone())
        self.linear_1 = nn.Linear(FEATURE_DIM, text.hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text.hidden_size, text.hidden_size)
        self.lm = LlamaForCausalLM(text)
        self.coder = SceneCoder(text.hidden_size)
        self.referent_head = nn.Linear(text.hidden_size, sum(REFERENT_SPLITS))
        # Is the first noun's object left of / right of / above / below the second's, read at the second.
        self.relation_head = nn.Linear(text.hidden_size, 4)
        # Optional (created last, so that runs without it keep their initialisation): at every image token,
        # is it the first kept token of its object in raster order, and its patch class.
        if image_head:
            self.image_head = nn.Linear(text.hidden_size, 1 + data.NUM_PATCH_CLASSES)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1((features - self.feat_mean) / self.feat_std)))

    def forward(
        self, image, input_ids, attention_mask, position_ids, layers: Sequence[int] = (), image_layer: int | None = None
    ):
        """Final text-position hidden states, then those of each layer in ``layers``, then (if ``image_layer``
        is given) the image-position hidden states of that layer.

        ``image`` holds already embedded image tokens (projected features or scene codes), padded to one length.
        """
        text = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([image.to(text.dtype), text], dim=1)
        hidden = self.lm.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=bool(layers) or image_layer is not None,
        )
        n_img = image.shape[1]
        out = [hidden.last_hidden_state[:, n_img:]]
        out += [hidden.hidden_states[k][:, n_img:] for k in layers]
        if image_layer is not None:
            out.append(hidden.hidden_states[image_layer][:, :n_img])
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(hidden)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under ``LlavaForConditionalGeneration`` names, with the input standardisation folded in."""
        w1 = self.linear_1.weight.detach() / self.feat_std[None, :]
        b1 = self.linear_1.bias.detach() - w1 @ self.feat_mean
        state = {
            "model.multi_modal_projector.linear_1.weight": w1,
            "model.multi_modal_projector.linear_1.bias": b1,
            "model.multi_modal_projector.linear_2.weight": self.linear_2.weight.detach(),
            "model.multi_modal_projector.linear_2.bias": self.linear_2.bias.detach(),
        }
        for key, value in self.lm.state_dict().items():
            if key.endswith("inv_freq"):
                continue
            if key.startswith("model."):
                state["model.language_model." + key[len("model.") :]] = value.detach()
            else:
                state[key] = value.detach()
        return {k: v.float().contiguous().clone() for k, v in state.items()}


# --------------------------------------------------------------------------- packing


@dataclass
class Packed:
    input_ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor  # (B, 1, L, L) bool
    position_ids: torch.Tensor
    answer_pos: list[tuple[int, int]]  # (row, text column) that predicts each question's answer
    question_start: list[tuple[int, int]]  # (row, text column) of each question's first token


@dataclass
class Packer:
    """Turns (image tokens, questions) into packed sequences with block masks."""

    tokenizer: object
    cache: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id

    def prompt_ids(self, question: str) -> list[int]:
        # Same tokens the processor produces after the image placeholders.
        if question not in self.cache:
            self.cache[question] = build.prompt_text_ids(self.tokenizer, question)
        return self.cache[question]

    def answer_id(self, answer: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(answer)

    def pack(
        self,
        batch: Sequence[Sequence[data.Question]],
        image_lengths: Sequence[int],
        with_answers: bool = True,
        image_positions: Sequence[np.ndarray | None] | None = None,
    ) -> Packed:
        """Row ``b`` holds ``image_lengths[b]`` image tokens (padded to the longest) and its questions.

        Image tokens take positions ``0..n-1`` and every question restarts at ``n``, exactly like a
        stand-alone ``<image>\\nQuestion: ... Answer:`` prompt with ``n`` image tokens (as after a
        reduction); padded image slots are seen by nobody. ``image_positions[b]``, where given, are row
        ``b``'s image position ids instead (the tokens' indices among all 577, as
        ``VisionZipConfig(positions="original")`` numbers a reduced image), and its questions then start
        at 577, where they start in the unreduced prompt.
        """
        n_max = max(image_lengths)
        rows, labels, segments, answer_pos, starts = [], [], [], [], []
        for b, questions in enumerate(batch):
            ids, lab, seg = [], [], []
            for j, q in enumerate(questions):
                p = self.prompt_ids(q.question)
                tail = [self.answer_id(q.answer), self.eos] if with_answers else []
                starts.append((b, len(ids)))
                answer_pos.append((b, len(ids) + len(p) - 1))
                ids += p + tail
                lab += [-100] * (len(p) - 1) + ([self.answer_id(q.answer), self.eos, -100] if with_answers else [-100])
                seg += [j] * (len(p) + len(tail))
            rows.append(ids)
            labels.append(lab)
            segments.append(seg)
        length = max(len(r) for r in rows)
        bsz = len(rows)
        input_ids = torch.full((bsz, length), self.pad, dtype=torch.long)
        label_t = torch.full((bsz, length), -100, dtype=torch.long)
        seg_t = torch.full((bsz, length), -1, dtype=torch.long)
        img_seg = torch.full((bsz, n_max), -1, dtype=torch.long)
        pos_t = torch.zeros((bsz, n_max + length), dtype=torch.long)
        for b, (ids, lab, seg) in enumerate(zip(rows, labels, segments, strict=True)):
            n_img = image_lengths[b]
            img_seg[b, :n_img] = -2
            kept = image_positions[b] if image_positions is not None else None
            if kept is None:
                pos_t[b, :n_img] = torch.arange(n_img)
                text_start = n_img
            else:
                if len(kept) != n_img:
                    raise ValueError(f"image_positions[{b}] holds {len(kept)} positions for {n_img} image tokens")
                pos_t[b, :n_img] = torch.as_tensor(np.asarray(kept), dtype=torch.long)
                text_start = build.NUM_IMAGE_TOKENS
            input_ids[b, : len(ids)] = torch.tensor(ids)
            label_t[b, : len(lab)] = torch.tensor(lab[: len(ids)])
            seg_t[b, : len(seg)] = torch.tensor(seg)
            pos, prev, k = [], None, 0
            for s in seg:
                k = k + 1 if s == prev else 0
                prev = s
                pos.append(text_start + k)
            pos_t[b, n_max : n_max + len(pos)] = torch.tensor(pos)
            pos_t[b, n_max + len(pos) :] = text_start
        total = n_max + length
        full_seg = torch.cat([img_seg, seg_t], dim=1)
        idx = torch.arange(total)
        causal = idx[None, :] <= idx[:, None]
        q_seg, k_seg = full_seg[:, :, None], full_seg[:, None, :]
        allowed = (k_seg == -2) | ((q_seg == k_seg) & (q_seg >= 0))
        allowed = allowed & causal[None]
        allowed |= torch.eye(total, dtype=torch.bool)[None]  # padding rows attend to themselves only
        return Packed(input_ids, label_t, allowed[:, None], pos_t, answer_pos, starts)


def pad_images(tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-scene (n_b, H) image tokens into (B, max n_b, H), zero-padded at the end."""
    out = tokens[0].new_zeros(len(tokens), max(t.shape[0] for t in tokens), tokens[0].shape[1])
    for b, t in enumerate(tokens):
        out[b, : t.shape[0]] = t
    return out
