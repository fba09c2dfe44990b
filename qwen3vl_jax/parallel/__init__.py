"""Parallelism: the device mesh and the logical-axis sharding rules (`sharding`), and the TPU chips' figures
(`chips`)."""
