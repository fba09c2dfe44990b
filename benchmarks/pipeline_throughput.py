"""Input pipeline throughput (examples/s and real tokens/s) with 0 and 2 grain worker processes.

    python benchmarks/pipeline_throughput.py [--batches 40]

Data: the built-in synthetic tasks + real digits, packed into rows of 512 tokens / 1024 patches (the tiny
training config's shapes), byte tokenizer, small images. The ratio compares 2 workers against the
in-process pipeline measured in the same run.
"""

import argparse
import time

from absl import flags

from qwen3vl_jax.config import preset
from qwen3vl_jax.data.pipeline import DataConfig, build_dataset
from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template


def measure(workers: int, batches: int) -> tuple[float, float]:
    processor = Processor(
        byte_tokenizer(),
        load_chat_template(None),
        config=VisionProcessingConfig(
            image_min_pixels=32 * 32, image_max_pixels=128 * 128, video_min_pixels=0, video_max_pixels=8 * 64 * 64
        ),
    )
    config = DataConfig(
        sources=({"kind": "synthetic", "size": 100_000}, {"kind": "digits", "image_size": 64}),
        seq_len=512,
        max_patches=1024,
        batch_size=8,
        workers=workers,
    )
    iterator = iter(build_dataset(config, processor, model_config=preset("tiny")))
    next(iterator)  # start-up (worker processes, first batch) is not throughput
    examples = tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        examples += int(batch["segment_ids"].max(axis=1).sum())
        tokens += int((batch["segment_ids"] > 0).sum())
    elapsed = time.perf_counter() - start
    getattr(iterator, "close", lambda: None)()
    return examples / elapsed, tokens / elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    results = {workers: measure(workers, args.batches) for workers in (0, 2)}
    for workers, (examples, tokens) in results.items():
        print(f"workers={workers}: {examples:8.1f} examples/s  {tokens:10.0f} tokens/s")
    print(f"2 workers vs 0 workers: {results[2][0] / results[0][0]:.2f}x examples/s")


if __name__ == "__main__":
    main()
