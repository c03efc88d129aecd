"""Running vLLM for the serving tests: the offline runner in a subprocess and `vllm serve` with its health check."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("vllm_runner.py")
VLLM_ENV = {
    **os.environ,
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def run_vllm(workdir, runs):
    spec, result = workdir / "spec.json", workdir / "result.json"
    spec.write_text(json.dumps({"runs": runs}))
    completed = subprocess.run(
        [sys.executable, str(RUNNER), str(spec), str(result)],
        env=VLLM_ENV,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(result.read_text())["runs"]


# --- the OpenAI-compatible server ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(process, url, log, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


def stop(process):
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def serve_command(model, port, *options):
    """`vllm serve` on 127.0.0.1 for the tiny float32 models (eager, 1024-token context)."""
    command = [str(Path(sys.executable).with_name("vllm")), "serve", str(model), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--enforce-eager", "--dtype", "float32", "--max-model-len", "1024"]
    return command + [str(option) for option in options]


def start_server(command, log, cwd):
    with log.open("w") as log_file:
        return subprocess.Popen(command, env=VLLM_ENV, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd)


def prometheus_counter(port, name):
    """The value of counter `name` (summed over its label sets) from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    ]
    assert values, f"{name} not in /metrics"
    return sum(values)


# --- the reference: transformers + vlmzip ----------------------------------------------------------
MAX_NEW_TOKENS = 8  # vllm_runner.MAX_NEW_TOKENS
EOS_TOKEN_ID = 2


def reference_generate(model_class, model_dir, config, prompt, images, video=None):
    """Greedy tokens (up to and including EOS) and the prompt length from transformers + vlmzip.

    `config` None: the unreduced model. `video`: (frames array, fps), every frame kept, as
    `vllm_runner` gives it to vLLM.
    """
    import torch
    from transformers import AutoProcessor

    import vlmzip

    model = model_class.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    extra = {}
    if video is not None:
        from transformers.video_utils import VideoMetadata

        frames, fps = video
        count = len(frames)
        metadata = VideoMetadata(
            total_num_frames=count, fps=fps, duration=count / fps, frames_indices=list(range(count))
        )
        extra = {"videos": [frames], "video_metadata": [metadata], "do_sample_frames": False}
    inputs = processor(images=images or None, text=[prompt], return_tensors="pt", **extra)
    if config is not None and (images or video is not None):
        vlmzip.apply(model, config)
        inputs = vlmzip.prepare(model, inputs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0)
    prompt_length = inputs["input_ids"].shape[1]
    tokens = out[0, prompt_length:].tolist()
    if EOS_TOKEN_ID in tokens:
        tokens = tokens[: tokens.index(EOS_TOKEN_ID) + 1]
    return tokens, prompt_length


def qwen_workdir(root, build, config, sizes, video_frames, seed):
    """A tiny Qwen model (`build(dir, init_range=0.2)`), its plugin export and the test's images and video."""
    import numpy as np
    from PIL import Image

    from vlmzip.export import export_model

    build(root / "tiny", init_range=0.2)
    export_model(root / "tiny", root / "served", config)
    rng = np.random.default_rng(seed)
    for i, (height, width) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"image{i}.png")
    np.save(root / "video.npy", rng.integers(0, 256, (*video_frames, 3), dtype=np.uint8))
    return root


def image_paths(workdir, indices):
    return [str(workdir / f"image{i}.png") for i in indices]


def load_images(workdir, indices):
    from PIL import Image

    return [Image.open(path).convert("RGB") for path in image_paths(workdir, indices)]


def merged_tokens(workdir, index):
    """Merged (2x2) tokens Qwen's processor gives image `index` of the workdir."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(workdir / "tiny")
    grid = processor.image_processor(load_images(workdir, [index]), return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // 4
