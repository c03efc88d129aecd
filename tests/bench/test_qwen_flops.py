"""The tower FLOP count of Qwen towers (packed tokens, per-segment attention, merger) against hand counts."""

from __future__ import annotations

import torch

from conftest import make_qwen2_5_vl, make_qwen2_vl, make_qwen_processor, random_images
from families import make_qwen3_processor, make_qwen3_vl
from vlmzip.bench.flops import FlopCounter, projector_modules


def tower_gflops(model, processor) -> float:
    tower = model.model.visual
    pixels = processor.image_processor(random_images(1, seed=3), return_tensors="pt")  # one 300x400 image
    counter = FlopCounter(tower.blocks, torch.nn.ModuleList(), projector=projector_modules(model, tower))
    with counter, torch.no_grad():
        tower(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
    return counter.count.tower


def test_qwen2_vl_tower_flops_by_hand():
    # 12x18 patches of 14 px = 216 tokens in one segment; 2 blocks of width 32 with MLP 64:
    # qkv 32x96 + proj 32x32 + fc1 32x64 + fc2 64x32 = 8,192 multiply-adds per token.
    block = 2 * 216 * 8192 + 4 * 216 * 216 * 32
    # Merger: 54 units of 4 x 32 = 128 features through Linear(128, 128) and Linear(128, 64).
    merger = 2 * 54 * (128 * 128 + 128 * 64)
    assert tower_gflops(make_qwen2_vl(), make_qwen_processor()) == 2 * block + merger


def test_qwen2_5_vl_windowed_blocks_count_their_windows():
    # Width 32, SwiGLU MLP 64: qkv 3,072 + proj 1,024 + gate/up 4,096 + down 2,048 = 10,240 per token.
    linear = 2 * 216 * 10240
    # Block 1 attends over the whole image; blocks 0 and 2 within windows of 56 px = 2x2 merged units:
    # the 6x9 merged grid holds 3x4 windows of 16 patches and 3 edge windows of 2x1 units (8 patches).
    full = 4 * 216 * 216 * 32
    windowed = 4 * (12 * 16 * 16 + 3 * 8 * 8) * 32
    merger = 2 * 54 * (128 * 128 + 128 * 64)
    assert tower_gflops(make_qwen2_5_vl(), make_qwen_processor()) == 3 * linear + full + 2 * windowed + merger


def test_qwen3_vl_counts_deepstack_mergers():
    # 12x16 patches of 16 px = 192 tokens; 3 blocks of width 32, MLP 64 (fc1/fc2 with bias):
    # qkv 3,072 + proj 1,024 + fc1 2,048 + fc2 2,048 = 8,192 per token.
    block = 2 * 192 * 8192 + 4 * 192 * 192 * 32
    merger = 2 * 48 * (128 * 128 + 128 * 64)  # the main merger and each of the 2 deepstack mergers
    assert tower_gflops(make_qwen3_vl(), make_qwen3_processor()) == 3 * block + 3 * merger


def test_real_width_qwen2_5_vl_blocks_by_hand():
    # Two blocks of the --arch qwen2.5-vl-7b tower's shape (width 1280, SwiGLU 3,420, 16 heads, windows of
    # 8x8 patches; block 1 full attention) on a 224 px image: 16x16 = 256 patches, 4 windows of 64.
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vlmzip.bench.arch import ARCHS

    vision = ARCHS["qwen2.5-vl-7b"].build_config().vision_config.to_dict()
    vision.update(depth=2, fullatt_block_indexes=[1], out_hidden_size=64)
    config = Qwen2_5_VLConfig(vision_config=vision, text_config={"hidden_size": 64, "num_hidden_layers": 1})
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    processor = make_qwen_processor()
    tower = model.model.visual
    pixels = processor.image_processor(random_images(1, size=(224, 224)), return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, 16, 16]]
    counter = FlopCounter(tower.blocks, torch.nn.ModuleList(), projector=projector_modules(model, tower))
    with counter, torch.no_grad():
        tower(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
    per_token = 1280 * 3840 + 1280 * 1280 + 2 * 1280 * 3420 + 3420 * 1280
    linear = 2 * 2 * 256 * per_token
    attention = 4 * 256 * 256 * 1280 + 4 * 4 * 64 * 64 * 1280
    merger = 2 * 64 * (5120 * 5120 + 5120 * 64)
    assert counter.count.tower == linear + attention + merger
    # The same formula on the full tower and the benchmark's 2,304-patch image (32 blocks, 4 full, 36
    # windows) gives ~3,100 GFLOPs, the order of magnitude of a 32-layer, 1280-wide ViT.


def test_shared_layer_weights_keep_the_compute():
    from vlmzip.bench.arch import share_layer_weights

    model = make_qwen2_5_vl()
    counted = tower_gflops(model, make_qwen_processor())
    stored = sum(p.numel() for p in model.parameters())
    saved = share_layer_weights(model)
    blocks, layers = model.model.visual.blocks, model.model.language_model.layers
    assert all(b.attn.qkv.weight is blocks[0].attn.qkv.weight for b in blocks)
    assert all(layer.mlp.down_proj.weight is layers[0].mlp.down_proj.weight for layer in layers)
    per_block = sum(p.numel() for p in blocks[0].parameters())
    per_layer = sum(p.numel() for p in layers[0].parameters())
    assert saved == 2 * per_block + 1 * per_layer  # 3 blocks and 2 decoder layers keep one copy each
    assert sum(p.numel() for p in model.parameters()) == stored - saved
    assert tower_gflops(model, make_qwen_processor()) == counted
