"""Evaluate a checkpoint by generation on the config's eval sets and/or JSONL datasets.

    python -m experiments.eval --config=configs/tiny.py --checkpoint=/tmp/qwen3vl_tiny/hf     # an HF dir
    python -m experiments.eval --config=configs/tiny.py --workdir=/tmp/qwen3vl_tiny           # newest orbax step
    python -m experiments.eval --checkpoint=/path/hf_dir --jsonl=qa.jsonl [--jsonl=more.jsonl]

With --config the model runs sharded over the config's mesh (`config.mesh`, e.g. --config.mesh.fsdp=4
--config.mesh.tensor=2): each device reads its shard of an HF checkpoint, or restores it from the workdir. In a
multi-process run (--coordinator_address ... or the JAX_* variables; experiments.launch_local) every process
reads the same examples and takes part in every batch, whose rows are split over the mesh (without --config, a
data-parallel mesh over all devices); process 0 writes the report.

Metrics: exact match for every set; IoU >= 0.5 accuracy for grounding; absolute timestamp error (seconds) for
the video-temporal task; character accuracy for OCR. Writes summary.json, predictions.jsonl and report.md to
--output (default: <checkpoint or workdir>/eval).
"""

import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import qwen3vl_jax
from experiments import cli
from experiments.distributed_flags import join_run
from qwen3vl_jax import storage
from qwen3vl_jax.checkpoints.train_state import Checkpointer
from qwen3vl_jax.data.sources import JsonlSource
from qwen3vl_jax.evaluation.harness import eval_records, generate_answers, summarize, write_report
from qwen3vl_jax.parallel.sharding import make_mesh
from qwen3vl_jax.training.builder import StepBuilder, processor_from

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (eval sets; model for --workdir).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "An HF checkpoint directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir: its newest orbax checkpoint is evaluated.")
_JSONL = flags.DEFINE_multi_string("jsonl", [], "JSONL conversation files to evaluate (exact match).")
_OUTPUT = flags.DEFINE_string("output", None, "Report directory.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per generation batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Generated tokens per answer.")
_LIMIT = flags.DEFINE_integer("num_examples", 0, "Examples per eval set (0: the config's num_examples).")


def load_model():
    """(model, processor) from --checkpoint or from the newest checkpoint in --workdir; sharded over the
    config's mesh when there is a --config."""
    config = _CONFIG.value
    if _CHECKPOINT.value:
        processor = qwen3vl_jax.load_processor(_CHECKPOINT.value)
        if config is None:
            mesh = make_mesh({"data": -1}) if jax.process_count() > 1 else None
            return qwen3vl_jax.load_pretrained(_CHECKPOINT.value, mesh=mesh), processor
        builder = StepBuilder(config, make_mesh(config.mesh.to_dict()))
        logging.info("evaluating %s sharded over the mesh %s", _CHECKPOINT.value, dict(builder.mesh.shape))
        model = qwen3vl_jax.load_pretrained(_CHECKPOINT.value, mesh=builder.mesh, rules=builder.rules)
        return model, processor
    builder = StepBuilder(config, make_mesh(config.mesh.to_dict()))
    checkpointer = Checkpointer(os.path.join(_WORKDIR.value, "checkpoints"), keep=1, every=1)
    step = checkpointer.latest_step()
    if step is None:
        raise app.UsageError(f"no checkpoint in {_WORKDIR.value}")
    params = checkpointer.restore_state(step, builder.abstract_state()).params
    checkpointer.close()
    logging.info("evaluating step %d of %s", step, _WORKDIR.value)
    model = qwen3vl_jax.Qwen3VLModel(builder.model_config, params, mesh=builder.mesh, rules=builder.rules)
    return model, processor_from(config)


def eval_sets():
    """name -> list of records: the config's eval sets, then the JSONL files."""
    sets = {}
    if _CONFIG.value is not None and _CONFIG.value.get("eval"):
        for name, eval_set in _CONFIG.value.eval.sets.items():
            sets[name] = eval_records(eval_set.sources, _LIMIT.value or eval_set.num_examples)
    for path in _JSONL.value:
        source = JsonlSource(path)
        sets[os.path.basename(path)] = [source[i] for i in range(min(_LIMIT.value or len(source), len(source)))]
    return sets


def main(argv):
    del argv
    if bool(_CHECKPOINT.value) == bool(_WORKDIR.value):
        raise app.UsageError("give exactly one of --checkpoint and --workdir")
    if _WORKDIR.value and _CONFIG.value is None:
        raise app.UsageError("--workdir needs --config")
    join_run(_CONFIG.value)
    model, processor = load_model()
    results = []
    for name, records in eval_sets().items():
        results += generate_answers(
            model, processor, records=records, set_name=name, batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value
        )
    summary = summarize(results)
    if jax.process_index() != 0:
        return
    output = _OUTPUT.value or os.path.join(_CHECKPOINT.value or _WORKDIR.value, "eval")
    with storage.local_dir(output) as local:
        title = f"Evaluation of {_CHECKPOINT.value or _WORKDIR.value}"
        write_report(summary, results, directory=local, title=title)
        with open(os.path.join(local, "report.md")) as f:
            print(f.read())


if __name__ == "__main__":
    cli.run(main)
