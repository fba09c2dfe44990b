"""Data sources (built-in synthetic tasks, real digits, JSONL, ArrayRecord/TFDS) and the grain pipeline that
packs processed examples into static-shape batches."""
