"""Generation with a KV cache (greedy and sampling), compiled as one loop."""
