"""Pallas TPU kernels (JAX's bundled splash attention), wrapped for our layouts, meshes and CPU interpret mode."""
