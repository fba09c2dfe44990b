"""Generation-based evaluation: records read from eval sources, answers generated greedily by a `Qwen3VLModel`
(`harness`), and scored per task (`metrics`)."""
