"""Evaluate a checkpoint by generation on benchmarks (docs/evaluation.md), the config's eval sets or JSONL datasets.

    python -m experiments.eval --checkpoint=/path/hf_dir --task=docvqa --data=/data/DocVQA --output=/tmp/eval
    python -m experiments.eval --checkpoint=/path/hf_dir --task=mmmu,chartqa --data=/data/MMMU --data=/data/ChartQA
    python -m experiments.eval --checkpoint=/path/hf_dir --task=video_niah --niah_lengths=60,300 --niah_fps=2
    python -m experiments.eval --config=configs/tiny.py --checkpoint=/tmp/qwen3vl_tiny/hf     # an HF dir
    python -m experiments.eval --config=configs/tiny.py --workdir=/tmp/qwen3vl_tiny           # newest orbax step
    python -m experiments.eval --checkpoint=/path/hf_dir --jsonl=qa.jsonl [--jsonl=more.jsonl]

Benchmarks (`--task`, repeatable or a comma list; one `--data` per task in order, video_niah takes none): a
task's dataset in its Hugging Face layout (a parquet/arrow file, folder or glob, local or gs://; a JSONL file
with a media folder; `tfds:<name>[:<split>]`), its default split unless --split, its prompt and metric
(qwen3vl_jax/evaluation/benchmarks.py), `--max_new_tokens` defaulting to the task's. Results per task in
<output>/<task>/ (predictions.jsonl, summary.json, report.md): predictions are appended after each batch and a
rerun with the same --output answers only the examples not yet there. Batches are built from examples of similar
prompt length; a progress bar shows examples/s. With --task, the config gives the mesh (and, with --workdir, the
model); its own eval sets are evaluated only without --task.

With --config the model runs sharded over the config's mesh (`config.mesh`, e.g. --config.mesh.fsdp=4
--config.mesh.tensor=2), with the config's kernels (attention_impl, moe_backend): each device reads its shard of an
HF checkpoint, or restores it from the workdir. A mesh with a `context` axis (e.g. configs/qwen3_vl_8b.py:long)
prefills each prompt split over it and keeps its KV cache there (docs/long_context.md); --yarn_factor stretches the
MRoPE beyond the checkpoint's trained length. In a
multi-process run (--coordinator_address ... or the JAX_* variables; experiments.launch_local) every process
reads the same examples and takes part in every batch, whose rows are split over the mesh (without --config, a
data-parallel mesh over all devices); process 0 writes the report.

Eval sets and JSONL files: exact match for every set; IoU >= 0.5 accuracy for grounding; absolute timestamp
error (seconds) for the video-temporal task; character accuracy for OCR. Writes summary.json, predictions.jsonl
and report.md to --output (default: <checkpoint or workdir>/eval).
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
from qwen3vl_jax.config.model import with_yarn
from qwen3vl_jax.data.sources import JsonlSource
from qwen3vl_jax.evaluation.benchmarks import TASKS, data_location, get_task, read_examples
from qwen3vl_jax.evaluation.harness import (
    eval_records,
    evaluate_benchmark,
    generate_answers,
    summarize,
    write_report,
)
from qwen3vl_jax.evaluation.readers import count_rows
from qwen3vl_jax.evaluation.video_niah import check_processor_keeps_every_frame, niah_examples, video_frames
from qwen3vl_jax.parallel.sharding import make_mesh
from qwen3vl_jax.training.builder import StepBuilder, processor_from

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config (eval sets; model for --workdir).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "An HF checkpoint directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir: its newest orbax checkpoint is evaluated.")
_JSONL = flags.DEFINE_multi_string("jsonl", [], "JSONL conversation files to evaluate (exact match).")
_OUTPUT = flags.DEFINE_string("output", None, "Report directory.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Prompts per generation batch.")
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", None, "Generated tokens per answer (default: the task's; 32 for eval sets and JSONL files)."
)
_LIMIT = flags.DEFINE_integer(
    "num_examples", 0, "Examples per task or eval set (0: all of a task's; the config's num_examples for its sets)."
)
_TASKS = flags.DEFINE_multi_string("task", [], "Benchmark tasks (repeatable or comma-separated): " + ", ".join(TASKS))
_DATA = flags.DEFINE_multi_string("data", [], "One dataset path per --task that reads one, in order (see above).")
_SPLIT = flags.DEFINE_string("split", None, "The split every --task reads (default: each task's own).")
_MEDIA_DIR = flags.DEFINE_string("media_dir", None, "Folder of the media files the data names (default: the data's).")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", None, "data_dir of the prepared TFDS datasets (tfds: paths).")
_BUCKET_BATCHES = flags.DEFINE_integer(
    "bucket_batches", 32, "Batches of examples read, sorted by prompt length and batched together at a time."
)
_NIAH_LENGTHS = flags.DEFINE_list("niah_lengths", ["60", "120", "240", "360"], "video_niah: video lengths (s).")
_NIAH_DEPTHS = flags.DEFINE_list("niah_depths", ["0", "0.25", "0.5", "0.75", "1"], "video_niah: needle depths.")
_NIAH_FPS = flags.DEFINE_float("niah_fps", 2.0, "video_niah: frames per second of the videos.")
_NIAH_HAYSTACK = flags.DEFINE_string("niah_haystack", None, "video_niah: a haystack video file (default: synthetic).")
_NIAH_NEEDLES = flags.DEFINE_integer("niah_needles", 1, "video_niah: examples per (length, depth) cell.")
_NIAH_IMAGE_SIZE = flags.DEFINE_integer("niah_image_size", 256, "video_niah: the frames' longer side (px).")
_NIAH_SEED = flags.DEFINE_integer("niah_seed", 0, "video_niah: seed of the codes and synthetic scenes.")
_YARN = flags.DEFINE_float(
    "yarn_factor", None, "YaRN on the text MRoPE for inputs this many times the checkpoint's trained length."
)
# how the config runs the model (kernels), applied to a --checkpoint evaluated on its mesh
RUNTIME_FIELDS = ("attention_impl", "splash_block_sizes", "moe_backend", "moe_tiling")


def load_model():
    """(model, processor) from --checkpoint or from the newest checkpoint in --workdir; sharded over the
    config's mesh when there is a --config."""
    config = _CONFIG.value
    if _CHECKPOINT.value:
        processor = qwen3vl_jax.load_processor(_CHECKPOINT.value)
        if config is None:
            mesh = make_mesh({"data": -1}) if jax.process_count() > 1 else None
            return qwen3vl_jax.load_pretrained(_CHECKPOINT.value, mesh=mesh, yarn_factor=_YARN.value), processor
        builder = StepBuilder(config, make_mesh(config.mesh.to_dict()))
        logging.info("evaluating %s sharded over the mesh %s", _CHECKPOINT.value, dict(builder.mesh.shape))
        runtime = {name: getattr(builder.model_config, name) for name in RUNTIME_FIELDS}
        model = qwen3vl_jax.load_pretrained(
            _CHECKPOINT.value, mesh=builder.mesh, rules=builder.rules, yarn_factor=_YARN.value, **runtime
        )
        return model, processor
    builder = StepBuilder(config, make_mesh(config.mesh.to_dict()))
    checkpointer = Checkpointer(os.path.join(_WORKDIR.value, "checkpoints"), keep=1, every=1)
    step = checkpointer.latest_step()
    if step is None:
        raise app.UsageError(f"no checkpoint in {_WORKDIR.value}")
    params = checkpointer.restore_state(step, builder.abstract_state()).params
    checkpointer.close()
    logging.info("evaluating step %d of %s", step, _WORKDIR.value)
    model_config = builder.model_config
    if _YARN.value is not None:
        model_config = with_yarn(model_config, factor=_YARN.value)
    model = qwen3vl_jax.Qwen3VLModel(model_config, params, mesh=builder.mesh, rules=builder.rules)
    return model, processor_from(config)


def eval_sets():
    """name -> list of records: the config's eval sets, then the JSONL files."""
    sets = {}
    if _CONFIG.value is not None and _CONFIG.value.get("eval") and not _TASKS.value:
        for name, eval_set in _CONFIG.value.eval.sets.items():
            sets[name] = eval_records(eval_set.sources, _LIMIT.value or eval_set.num_examples)
    for path in _JSONL.value:
        source = JsonlSource(path)
        sets[os.path.basename(path)] = [source[i] for i in range(min(_LIMIT.value or len(source), len(source)))]
    return sets


def benchmark_tasks() -> list[tuple[str, str | None]]:
    """(task name, its data path) per --task, in order; a usage error for an unknown task or a missing path."""
    names = [name.strip() for value in _TASKS.value for name in value.split(",") if name.strip()]
    for name in names:
        try:
            get_task(name)
        except ValueError as e:
            raise app.UsageError(str(e)) from None
    reading = [name for name in names if get_task(name).examples is not None]
    if len(_DATA.value) != len(reading):
        raise app.UsageError(
            f"give one --data per --task that reads a dataset ({', '.join(reading) or 'none'}), in order; got "
            f"{len(_DATA.value)} --data"
        )
    paths = iter(_DATA.value)
    return [(name, next(paths) if name in reading else None) for name in names]


def check_data(tasks: list[tuple[str, str | None]]) -> dict[str, int | None]:
    """Each task's rows (None when unknown), read from the files' metadata before the model loads: a path with
    no data files is an error naming it."""
    totals = {}
    for name, path in tasks:
        task = get_task(name)
        if path is None:
            continue
        rows = count_rows(data_location(task, path), split=_SPLIT.value or task.split)
        rows = rows if task.one_example_per_row else None
        totals[name] = min(rows, _LIMIT.value) if rows is not None and _LIMIT.value else rows
    return totals


def niah_grid(processor) -> list:
    """The video_niah examples of the --niah_* flags, after checking that the processor keeps every frame."""
    lengths, depths = [float(v) for v in _NIAH_LENGTHS.value], [float(v) for v in _NIAH_DEPTHS.value]
    for length in lengths:
        check_processor_keeps_every_frame(
            processor.config, fps=_NIAH_FPS.value, num_frames=video_frames(length, fps=_NIAH_FPS.value)
        )
    examples = niah_examples(
        lengths=lengths,
        depths=depths,
        fps=_NIAH_FPS.value,
        haystack=_NIAH_HAYSTACK.value,
        needles_per_cell=_NIAH_NEEDLES.value,
        seed=_NIAH_SEED.value,
        image_size=_NIAH_IMAGE_SIZE.value,
    )
    return examples[: _LIMIT.value] if _LIMIT.value else examples


def run_benchmarks(model, processor, tasks: list[tuple[str, str | None]], *, totals: dict, output: str) -> None:
    for name, path in tasks:
        task = get_task(name)
        if path is None:
            examples = niah_grid(processor)
            total = len(examples)
        else:
            reading = dict(split=_SPLIT.value, media_dir=_MEDIA_DIR.value, tfds_data_dir=_TFDS_DATA_DIR.value)
            examples, total = read_examples(task, path, limit=_LIMIT.value, **reading), totals[name]
        summary = evaluate_benchmark(
            model,
            processor,
            task=task,
            examples=examples,
            output=output,
            batch_size=_BATCH.value,
            max_new_tokens=_MAX_NEW.value or task.max_new_tokens,
            window_batches=_BUCKET_BATCHES.value,
            total=total,
        )
        if jax.process_index() == 0:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items()) or "no example answered"
            counts = f"{summary['examples']} examples, {summary['skipped']['count']} skipped"
            print(f"{name}: {metrics} ({counts}) -> {os.path.join(output, name)}")


def main(argv):
    del argv
    if bool(_CHECKPOINT.value) == bool(_WORKDIR.value):
        raise app.UsageError("give exactly one of --checkpoint and --workdir")
    if _WORKDIR.value and _CONFIG.value is None:
        raise app.UsageError("--workdir needs --config")
    tasks = benchmark_tasks()
    totals = check_data(tasks)
    join_run(_CONFIG.value)
    model, processor = load_model()
    output = _OUTPUT.value or os.path.join(_CHECKPOINT.value or _WORKDIR.value, "eval")
    run_benchmarks(model, processor, tasks, totals=totals, output=output)
    results = []
    for name, records in eval_sets().items():
        answering = dict(batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value or 32)
        results += generate_answers(model, processor, records=records, set_name=name, **answering)
    if not results or jax.process_index() != 0:
        return
    summary = summarize(results)
    with storage.local_dir(output) as local:
        title = f"Evaluation of {_CHECKPOINT.value or _WORKDIR.value}"
        write_report(summary, results, directory=local, title=title)
        with open(os.path.join(local, "report.md")) as f:
            print(f.read())


if __name__ == "__main__":
    cli.run(main)
