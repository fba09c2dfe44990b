"""Generation-based evaluation: records read from eval sources, answers generated greedily by a `Qwen3VLModel`
(`harness`), and scored per task (`metrics`); and the benchmarks of the Qwen3-VL report read from their published
datasets (`benchmarks`, `readers`), scored by their metrics (`benchmark_metrics`), answered resumably
(`harness.evaluate_benchmark`, `results`)."""
