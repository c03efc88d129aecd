"""Runs vLLM (offline `LLM`) on a JSON spec and writes what happened as JSON; the tests start it as a subprocess.

    python vllm_runner.py SPEC.json RESULT.json

SPEC: {"runs": [{"model": DIR, "hf_overrides": {...} | null, "llm_options": {...} | null,
                 "image_prompt": "USER: <image> what ? ASSISTANT:" | null, "repeat": 0,
                 "requests": [{"prompt": "USER: <image> ... ASSISTANT:", "images": [PNG paths],
                               "video": NPY path (frames, height, width, 3) uint8 | absent, "fps": 2.0}]}]}
RESULT: {"runs": [{"error": "..."} | {"outputs": [{"prompt_token_ids", "token_ids", "text"}],
                                      "max_image_tokens", "hf_processor_image_tokens",
                                      "repeats": [...], "prefix_cache": {"queries", "hits"}}]}
Each run builds its own engine; a run whose engine fails to start records the error and the next run goes on.
`repeat` > 0 sends the first request that many more times, one after the other, and records vLLM's
prefix-cache counters afterwards.
"""

from __future__ import annotations

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MAX_NEW_TOKENS = 8


def processor_checks(llm, image, prompt) -> dict:
    """What vLLM's multimodal processor for this model declares and what its HF processor emits."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    processor = MULTIMODAL_REGISTRY.create_processor(llm.llm_engine.model_config)
    info = processor.info
    hf_processor = info.get_hf_processor()
    encoded = hf_processor(images=[image], text=[prompt], return_tensors="pt")
    config = info.get_hf_config()
    image_token_id = getattr(config, "image_token_index", None) or config.image_token_id
    return {
        "max_image_tokens": info.get_max_image_tokens(),
        "hf_processor_image_tokens": int((encoded["input_ids"] == image_token_id).sum()),
    }


def video_input(path: str, fps: float) -> tuple:
    """A decoded video as vLLM takes it: (frames array, metadata), every frame kept (no sampling)."""
    import numpy as np

    frames = np.load(path)
    count = int(frames.shape[0])
    metadata = {
        "fps": fps,
        "total_num_frames": count,
        "duration": count / fps,
        "frames_indices": list(range(count)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }
    return frames, metadata


def record(output) -> dict:
    return {
        "prompt_token_ids": list(output.prompt_token_ids),
        "token_ids": list(output.outputs[0].token_ids),
        "text": output.outputs[0].text,
    }


def run_one(run: dict) -> dict:
    from PIL import Image
    from vllm import LLM, SamplingParams

    try:
        options = {
            "hf_overrides": run.get("hf_overrides") or {},
            "enforce_eager": True,
            "max_model_len": 1024,
            "dtype": "float32",
            "seed": 0,
            "limit_mm_per_prompt": {"image": 2},
            "disable_log_stats": False,
            **(run.get("llm_options") or {}),
        }
        llm = LLM(model=run["model"], **options)
    except Exception as error:  # noqa: BLE001 - the test asserts on the message
        return {"error": f"{type(error).__name__}: {error}"}
    requests = []
    first_image = None
    for request in run["requests"]:
        images = [Image.open(path).convert("RGB") for path in request["images"]]
        first_image = first_image or (images[0] if images else None)
        item = {"prompt": request["prompt"]}
        if images:
            item["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
        if request.get("video"):
            item.setdefault("multi_modal_data", {})["video"] = video_input(request["video"], request.get("fps", 2.0))
        requests.append(item)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)
    result = {"outputs": [record(o) for o in llm.generate(requests, params, use_tqdm=False)]}
    if run.get("repeat"):
        result["repeats"] = [
            record(llm.generate(requests[:1], params, use_tqdm=False)[0]) for _ in range(run["repeat"])
        ]
        counters = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
        result["prefix_cache"] = {
            "queries": counters.get("vllm:prefix_cache_queries"),
            "hits": counters.get("vllm:prefix_cache_hits"),
        }
    if first_image is not None:
        prompt = run.get("image_prompt") or "USER: <image> what ? ASSISTANT:"
        result.update(processor_checks(llm, first_image, prompt))
    del llm
    gc.collect()
    return result


def main(spec_path: str, result_path: str) -> int:
    with open(spec_path, encoding="utf-8") as handle:
        spec = json.load(handle)
    results = [run_one(run) for run in spec["runs"]]
    with open(result_path, "w", encoding="utf-8") as handle:
        json.dump({"runs": results}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
