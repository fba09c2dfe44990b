"""Input pipeline throughput (examples/s and real tokens/s) with 0 and 2 grain worker processes.

    python benchmarks/pipeline_throughput.py [--batches 40]
    python benchmarks/pipeline_throughput.py --long [--batches 3]

Data: the built-in synthetic tasks + real digits, packed into rows of 512 tokens / 1024 patches (the tiny
training config's shapes), byte tokenizer, small images. The ratio compares 2 workers against the
in-process pipeline measured in the same run.

--long: the paper's long-context rows, 262,144 tokens + 262,144 patches laid out for 8 context shards
(configs/released.py `:long`), in process, against rows of 8,192 tokens + 8,192 patches of the same data (the
released configs' rows) measured in the same run; the synthetic videos have 64 frames.
"""

import argparse
import time

from absl import flags

from qwen3vl_jax.config import preset
from qwen3vl_jax.data.pipeline import DataConfig, build_dataset
from qwen3vl_jax.processing import Processor, VisionProcessingConfig, byte_tokenizer
from qwen3vl_jax.processing.chat import load_chat_template


def measure(workers: int, batches: int, *, seq_len: int = 512, max_patches: int = 1024, long_videos: bool = False):
    processor = Processor(
        byte_tokenizer(),
        load_chat_template(None),
        config=VisionProcessingConfig(
            image_min_pixels=32 * 32, image_max_pixels=128 * 128, video_min_pixels=0, video_max_pixels=8 * 64 * 64
        ),
    )
    synthetic = {"kind": "synthetic", "size": 100_000, **({"num_frames": 64} if long_videos else {})}
    config = DataConfig(
        sources=(synthetic, {"kind": "digits", "image_size": 64}),
        seq_len=seq_len,
        max_patches=max_patches,
        batch_size=8 if seq_len <= 8192 else 1,
        workers=workers,
        context_shards=8 if seq_len > 8192 else 1,
    )
    iterator = iter(build_dataset(config, processor, model_config=preset("tiny")))
    next(iterator)  # start-up (worker processes, first batch) is not throughput
    examples = tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        examples += int(batch.segment_ids.max(axis=1).sum())
        tokens += int((batch.segment_ids > 0).sum())
    elapsed = time.perf_counter() - start
    getattr(iterator, "close", lambda: None)()
    return examples / elapsed, tokens / elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--long", action="store_true", help="262,144-token rows against 8,192-token rows")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    if args.long:
        rows = {8192: 32, 262_144: args.batches if args.batches != 40 else 3}  # about as many tokens each
        long = {n: measure(0, count, seq_len=n, max_patches=n, long_videos=True) for n, count in rows.items()}
        for n, (examples, tokens) in long.items():
            print(f"rows of {n:7,d} tokens + patches: {examples:8.1f} examples/s  {tokens:10.0f} tokens/s")
        print(f"262,144-token rows vs 8,192-token rows: {long[262_144][1] / long[8192][1]:.2f}x tokens/s")
        return
    results = {workers: measure(workers, args.batches) for workers in (0, 2)}
    for workers, (examples, tokens) in results.items():
        print(f"workers={workers}: {examples:8.1f} examples/s  {tokens:10.0f} tokens/s")
    print(f"2 workers vs 0 workers: {results[2][0] / results[0][0]:.2f}x examples/s")


if __name__ == "__main__":
    main()
