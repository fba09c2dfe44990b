"""Helpers shared by the test modules: paths, the train binary and its metrics, the tiny model with an optimizer
config and the default training config, and the real files of tests/data (see its README for provenance and
licences) with synthetic videos encoded by PyAV at chosen frame rates, sizes and lengths."""

from __future__ import annotations

import functools
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from typing import ClassVar

import av
import jax
import numpy as np
from absl import flags
from ml_collections import ConfigDict, config_flags

from qwen3vl_jax.config import preset
from qwen3vl_jax.modeling.model import init_params
from qwen3vl_jax.training.run_config import config_from_file
from qwen3vl_jax.training.train_step import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# for the binaries: one CPU device, as a user's machine has, and the tests' other XLA flags (conftest.py)
XLA_FLAGS = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", "")).strip()
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=XLA_FLAGS)

# ------------------------------------------------------------------------------------------------ the train binary


def command(workdir, *, steps, every, config="configs/tiny.py"):
    return [
        sys.executable,
        "-m",
        "experiments.train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.steps={steps}",
        f"--config.checkpoint.every={every}",
        "--config.checkpoint.keep=2",
        "--config.log_every=1",
        "--config.eval.every=0",
        "--config.export_hf=False",
        "--config.data.seq_len=128",
        "--config.data.max_patches=64",
        "--config.data.batch_size=4",
        "--config.peak_flops_per_device=1e11",
    ]


def losses(workdir) -> dict[int, float]:
    """Train loss per step; a step run again after a resume overwrites the earlier line."""
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
        for line in lines:
            if line.endswith("\n"):
                record = json.loads(line)
                if record["split"] == "train":
                    out[record["step"]] = record["loss"]
    return out


def compile_for_tpu(config: str, *flags: str, timeout: int = 900) -> str:
    """`experiments.compile` of `config` for a v5p:2x2x1 topology (libtpu's compiler, run on this CPU) with more
    `flags` (without the modeled step time unless they ask for it: its compiles are tests/test_step_time.py's);
    asserts that it succeeded and returns what it printed."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    binary = [sys.executable, "-m", "experiments.compile", f"--config={config}", "--topology=v5p:2x2x1"]
    if not any(flag.startswith("--step_time") for flag in flags):
        binary.append("--step_time=none")
    result = subprocess.run([*binary, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def flip_bytes_in_largest_file(directory) -> str:
    """Flips bytes inside the largest file under `directory` (what a bad disk or copy does); returns its path."""
    files = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "rb") as f:
        data = bytearray(f.read())
    for i in range(100, len(data), 997):
        data[i] ^= 0xFF
    with open(largest, "wb") as f:
        f.write(data)
    return largest


class RecordingFile(io.FileIO):
    """A local file that records the byte ranges read from it (a checkpoint loader's `opener`)."""

    reads: ClassVar[list] = []

    def read(self, size=-1):
        start = self.tell()
        data = super().read(size)
        RecordingFile.reads.append((self.name, start, len(data)))
        return data


def data_bytes_read() -> int:
    """Bytes RecordingFile read from safetensors files' tensor data, not counting each file's header (its 8-byte
    length at 0, then the JSON header from byte 8)."""
    data_start = {name: 8 + length for name, start, length in RecordingFile.reads if start == 8}
    return sum(length for name, start, length in RecordingFile.reads if start >= data_start[name])


# ------------------------------------------------------------------------------------------------ models and configs

CONFIG = preset("tiny")
# Adam's first update is ~lr * g / (|g| + eps): with a tiny eps it turns rounding noise in near-zero gradients
# into +-lr jumps, so the tests use eps = 1e-4 to compare updates that depend smoothly on the gradients.
OPTIMIZER = ConfigDict(dict(lr=1e-3, warmup_steps=0, final_lr_ratio=0.1, clip_norm=1.0, freeze=()))
OPTIMIZER.update(b1=0.9, b2=0.95, eps=1e-4, weight_decay=0.1)


@functools.cache
def _jitted_init():
    return jax.jit(init_params, static_argnums=0)


def random_params(config=CONFIG, seed: int = 0):
    """init_params(config, PRNGKey(seed)), compiled once per config and process (op by op it costs ~10 s each
    time)."""
    return _jitted_init()(config, jax.random.PRNGKey(seed))


def initial_state(optimizer):
    params = random_params()
    return TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(1))


def parse_flags(*argv: str) -> ConfigDict:
    """The config that `--config=...` and `--config.x=...` flags give a binary (absl's parser, not a copy of it)."""
    flag_values, argv = flags.FlagValues(), ["binary", *argv]
    config = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    return config.value


def with_byte_processor(checkpoint: str, directory) -> str:
    """A copy of the HF checkpoint directory `checkpoint` at `directory` with the byte tokenizer and the bundled
    chat template saved beside its weights (the processor a run with model.init_from=directory reads)."""
    from qwen3vl_jax.processing import Processor, byte_tokenizer
    from qwen3vl_jax.processing.chat import load_chat_template

    shutil.copytree(checkpoint, directory)
    Processor(byte_tokenizer(), load_chat_template(None)).save_pretrained(str(directory))
    return str(directory)


def tiny_config() -> ConfigDict:
    """configs/tiny.py's get_config() (configs/ is not a package the tests import)."""
    return config_from_file(os.path.join(ROOT, "configs", "tiny.py"))


# ------------------------------------------------------------------------------------------------ tests/data and videos

DATA = os.path.join(ROOT, "tests", "data")
IMAGES = ("astronaut.jpg", "chelsea.png", "coffee.jpg", "page.png", "text.png", "china.jpg", "grace_hopper.jpg")
CAMERA_CLIP = os.path.join(DATA, "videos", "bikes.mp4")  # 640x272, 25 fps, 250 frames


def image(name: str) -> str:
    """The absolute path of tests/data/images/<name>."""
    path = os.path.join(DATA, "images", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no test image {name!r} in {os.path.dirname(path)}")
    return path


def write_qwen_tokenizer_dir(directory: str) -> str:
    """A checkpoint-like directory with the real Qwen3 `tokenizer.json` (decompressed from tests/data) and the
    package's bundled Qwen3-VL chat template."""
    from qwen3vl_jax.processing.chat import load_chat_template

    os.makedirs(directory, exist_ok=True)
    with (
        lzma.open(os.path.join(DATA, "qwen3_tokenizer.json.xz"), "rb") as source,
        open(os.path.join(directory, "tokenizer.json"), "wb") as target,
    ):
        shutil.copyfileobj(source, target)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(load_chat_template(None))
    return directory


def frame_level(index: int) -> int:
    """The grey level of frame `index` in `write_video`'s clips: distinct enough to tell frames apart after lossy
    coding (16 levels apart, wrapping every 16 frames)."""
    return 8 + 16 * (index % 16)


def write_video(
    path: str, *, num_frames: int, fps: float | Fraction, height: int, width: int, codec: str = "mpeg4"
) -> str:
    """Encodes a clip whose frame i is a uniform grey of `frame_level(i)` (so decoded frames can be identified),
    with a small coloured square moving one pixel per frame (real motion for the codec)."""
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(100_000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"qscale": "2"} if codec == "mpeg4" else {}
        for i in range(num_frames):
            frame = np.full((height, width, 3), frame_level(i), np.uint8)
            top, left = i % max(height - 4, 1), i % max(width - 4, 1)
            frame[top : top + 4, left : left + 4] = (255, 0, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
