"""Peak host memory of loading an HF checkpoint onto 8 devices (fsdp 4 x tensor 2), above the loaded arrays.

    python benchmarks/load_memory.py [--layers 16]

Writes a ~2.3 GB float32 checkpoint (a Qwen3-VL of hidden 1024, 16 decoder layers, the released 151,936-token
vocabulary, untied head) to a temporary directory, then loads it in two fresh processes on 8 fake CPU devices:

* streamed: `hf_io.load_params(path, config, shardings)`: each device's shard read from the files on its own;
* whole copy (the baseline, what the loader did before): every tensor read whole with the `safetensors`
  library into a host copy of the model, then `jax.device_put` into the same shardings.

Each process reports its peak resident memory (Linux VmHWM, reset before loading) minus its resident memory before
loading minus the bytes of
the loaded arrays (on CPU devices, the arrays live in host memory too): what loading needs beyond its result.
The bound to meet: the largest single tensor plus 10% of the model.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

MIB = 2**20


def config(layers: int):
    from qwen3vl_jax.config import preset

    return preset("tiny").replace(
        tie_word_embeddings=False,
        vision=dict(out_hidden_size=1024),
        text=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=128,
            vocab_size=151_936,
            mrope_section=(24, 20, 20),
        ),
    )


def write_checkpoint(path: str, layers: int) -> dict:
    import jax
    import numpy as np
    from flax.traverse_util import flatten_dict

    from qwen3vl_jax.checkpoints import hf_io
    from qwen3vl_jax.checkpoints.hf_mapping import hf_rules
    from qwen3vl_jax.modeling.model import init_params

    model_config = config(layers)
    params = jax.jit(init_params, static_argnums=0)(model_config, jax.random.key(0))
    hf_io.save_params(path, params, config=model_config)
    sizes = [np.asarray(x).nbytes for x in flatten_dict(jax.device_get(params)).values()]
    rules = hf_rules(model_config)
    largest = max(int(np.prod(r.hf_shape)) * 4 for r in rules)
    return dict(model_bytes=sum(sizes), largest_tensor_bytes=largest)


def memory_status(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak_memory() -> None:
    """Sets VmHWM to the current resident size (Linux: writing 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(path: str, layers: int, method: str) -> dict:
    """Runs in a fresh process with 8 fake devices."""
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors.numpy import load_file

    from qwen3vl_jax.checkpoints import hf_io
    from qwen3vl_jax.checkpoints.hf_mapping import hf_rules
    from qwen3vl_jax.modeling.model import abstract_params
    from qwen3vl_jax.parallel.sharding import make_mesh, param_shardings

    model_config = config(layers)
    shardings = param_shardings(abstract_params(model_config, boxed=True), make_mesh({"fsdp": 4, "tensor": 2}))
    reset_peak_memory()
    before = memory_status("VmRSS")
    if method == "streamed":
        params = hf_io.load_params(path, model_config, shardings)
    else:  # every tensor whole on the host, then put into the shardings
        import numpy as np

        tensors = {}
        for file in sorted(set(hf_io.checkpoint_files(path).values())):
            tensors.update(load_file(file))
        flat = {p: np.zeros(x.shape, np.float32) for p, x in flatten_dict(abstract_params(model_config)).items()}
        for rule in hf_rules(model_config):
            target = flat[rule.path] if rule.index is None else flat[rule.path][rule.index]
            target[...] = rule.to_ours(tensors.pop(rule.hf), target.shape)
        params = jax.device_put(unflatten_dict(flat), shardings)
        del flat
    jax.block_until_ready(params)
    peak = memory_status("VmHWM")
    loaded = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(params) for s in x.addressable_shards)
    return dict(method=method, peak_above_start=peak - before, loaded_bytes=loaded)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--measure", choices=["streamed", "whole"])
    parser.add_argument("--path")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.path, args.layers, args.measure)))
        return
    with tempfile.TemporaryDirectory() as path:
        sizes = write_checkpoint(path, args.layers)
        files = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        largest = sizes["largest_tensor_bytes"] / MIB
        print(f"checkpoint: {files / MIB:,.0f} MiB of safetensors; largest tensor {largest:,.0f} MiB")
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
        results = {}
        for method in ("whole", "streamed"):
            command = [sys.executable, __file__, "--measure", method, "--path", path, "--layers", str(args.layers)]
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            results[method] = json.loads(out.strip().splitlines()[-1])
    bound = sizes["largest_tensor_bytes"] + 0.1 * sizes["model_bytes"]
    for method, label in (
        ("whole", "whole copy, then device_put (before)"),
        ("streamed", "streamed shards (load_params)"),
    ):
        r = results[method]
        extra = r["peak_above_start"] - r["loaded_bytes"]
        print(
            f"{label:40s} loaded {r['loaded_bytes'] / MIB:8,.0f} MiB; peak host memory above the loaded arrays "
            f"{extra / MIB:8,.0f} MiB ({extra / sizes['model_bytes']:.2f} x the model)"
        )
    streamed = results["streamed"]["peak_above_start"] - results["streamed"]["loaded_bytes"]
    whole = results["whole"]["peak_above_start"] - results["whole"]["loaded_bytes"]
    print(
        f"streamed / whole copy: {streamed / whole:.2f}x; bound (largest tensor + 10% of the model) "
        f"{bound / MIB:,.0f} MiB -> {'met' if streamed <= bound else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
