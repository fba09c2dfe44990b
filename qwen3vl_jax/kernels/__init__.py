"""The Pallas TPU kernels the model calls: splash attention and the megablox grouped matmul. Off TPU they run in
interpret mode."""

import jax


def interpret_kernels() -> bool:
    """Interpret the kernels unless they will run on TPUs (the mesh's devices when one is set: AOT compiles for
    a TPU topology from a CPU host)."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = mesh.abstract_device.platform if not mesh.empty else jax.default_backend()
    return platform != "tpu"
