"""The package's imports follow its data flow (processing -> data -> inputs -> modeling -> kernels -> training /
inference -> checkpoints -> experiments; evaluation and ablation on top), and no module is over 400 lines. Read
from the source with `ast`, function-level imports included; nothing is imported."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "qwen3vl_jax"
MAX_LINES = 400
ABOVE_THE_MODEL = {"api", "checkpoints", "training", "inference", "evaluation", "ablation"}
# subpackage (or top-level module) -> the parts of the package it must not import
FORBIDDEN = {
    "storage": {"*"},
    "config": ABOVE_THE_MODEL | {"processing", "data", "inputs", "modeling", "kernels", "parallel"},
    "processing": ABOVE_THE_MODEL,
    "data": ABOVE_THE_MODEL,
    "inputs": ABOVE_THE_MODEL,
    "modeling": ABOVE_THE_MODEL,
    "kernels": ABOVE_THE_MODEL,
    "parallel": ABOVE_THE_MODEL,
    # the engine: generation and sampling on a model, nothing that loads, trains or evaluates one
    "inference": {"api", "evaluation", "data", "checkpoints", "training", "ablation"},
    "checkpoints": {"api", "training", "inference", "evaluation", "ablation"},
}


def part_of(module: str) -> str | None:
    """The part of the package ("modeling", "storage", "api", ...) that `module` names; None outside it."""
    names = module.split(".")
    if names[0] != "qwen3vl_jax":
        return None
    # `import qwen3vl_jax` runs the package's __init__, which imports api
    return names[1] if len(names) > 1 else "api"


def imported_modules(file: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every import in `file`, at any depth; `from a import b` counts as a.b (b may be a module)."""
    tree = ast.parse(file.read_text(), filename=str(file))
    package = ".".join(("qwen3vl_jax", *file.relative_to(PACKAGE).parent.parts))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def package_files() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def edges() -> list[tuple[str, str, str]]:
    """(importing part, imported part, "file:line") for every import of one part of the package by another."""
    result = []
    for file in package_files():
        relative = file.relative_to(PACKAGE)
        importer = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        for line, module in imported_modules(file):
            imported = part_of(module)
            if imported is not None and imported != importer:
                result.append((importer, imported, f"qwen3vl_jax/{relative}:{line}"))
    return result


def test_the_import_graph_is_read():
    """The walker sees imports at module level, inside functions, and relative ones."""
    found = {(a, b) for a, b, _ in edges()}
    assert {("modeling", "parallel"), ("api", "inference"), ("training", "modeling")} <= found, sorted(found)


def test_imports_follow_the_data_flow():
    wrong = [
        f"{where}: {importer}/ imports {imported}"
        for importer, imported, where in edges()
        if importer in FORBIDDEN and ({imported, "*"} & FORBIDDEN[importer])
    ]
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_no_module_is_over_the_line_limit():
    sizes = {file: len(file.read_text().splitlines()) for file in package_files()}
    assert len(sizes) > 50, "the walk did not find the package's modules"
    long = [f"qwen3vl_jax/{file.relative_to(PACKAGE)}: {n} lines" for file, n in sizes.items() if n > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)
