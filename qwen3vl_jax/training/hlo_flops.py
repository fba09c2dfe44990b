"""Matmul FLOPs of a compiled XLA program, with every loop body counted as many times as the loop runs.

XLA's `compiled.cost_analysis()` counts the body of a `while` loop once, so for a model whose layers are a
scan it reports a fraction of the work and cannot show what rematerialisation recomputes. This counts the
`dot` and `convolution` instructions of the optimised HLO text (`compiled.as_text()`; XLA:TPU writes most
matmuls as convolutions), multiplies each computation by how often its callers run it (a scan's trip count
is read from its loop condition `i < N`, its counter's start and its step), and counts the calls of each
Pallas (Mosaic) kernel the same way: their FLOPs are not in the HLO, so the caller adds them from the model
(see `experiments/planner.py`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%(\S+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(.*)$")
_ARRAY_SHAPE = re.compile(r"^(\w+)\[([\d,]*)\]")
_OPCODE = re.compile(r"\s([a-z][\w-]*)\(")
_OPERAND = re.compile(r"%([\w.-]+)")
_RESULT_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


# what one collective moves is counted as its result's bytes (of a tuple result, the largest element: an async
# all-gather's result is (input, output))
COLLECTIVES = (
    "all-gather",
    "all-gather-start",
    "all-reduce",
    "all-reduce-start",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-permute-start",
)
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES |= {"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    dims: tuple[int, ...] | None  # None for tuple-shaped results
    result_bytes: float  # of a tuple-shaped result, its largest element
    opcode: str
    operands: tuple[str, ...]
    arguments: str  # the text inside the opcode's parentheses, e.g. a constant's value
    attributes: str


@dataclasses.dataclass
class ProgramFlops:
    """What one run of a compiled program does, per device (an SPMD program runs once on every chip).

    matmul_flops: 2 x multiply-adds of every dot / convolution XLA runs, loops included.
    collective_bytes: the result bytes of every collective (all-gather, all-reduce, reduce-scatter, all-to-all,
        collective-permute) it runs, loops included.
    kernel_calls: Pallas kernel name -> how many times it runs.
    unknown_trip_counts: loops whose trip count could not be read; their bodies are counted once.
    """

    matmul_flops: float
    kernel_calls: dict[str, int]
    unknown_trip_counts: list[str]
    collective_bytes: float = 0.0


@dataclasses.dataclass
class _Tally:
    flops: float = 0.0
    collective_bytes: float = 0.0
    calls: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    unknown: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: _Tally) -> None:
        self.flops += other.flops
        self.collective_bytes += other.collective_bytes
        self.calls.update(other.calls)
        self.unknown.extend(other.unknown)


def _split_arguments(text: str) -> tuple[str, str]:
    """`%a, %b), attr=...` -> the text inside the opcode's parentheses and the attribute text after them."""
    depth, end = 1, len(text)
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            end = i
            break
    return text[:end], text[end + 1 :]


def _parse_instruction(line: str) -> _Instruction | None:
    match = _INSTRUCTION.match(line)
    if match is None:
        return None
    name, rest = match.groups()
    opcode = _OPCODE.search(rest)
    if opcode is None:
        return None
    shape = _ARRAY_SHAPE.match(rest)
    dims = tuple(int(d) for d in shape.group(2).split(",") if d) if shape else None
    arguments, attributes = _split_arguments(rest[opcode.end() :])
    result_bytes = max(
        (
            _DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in extents.split(",") if d)
            for dtype, extents in _RESULT_ARRAY.findall(rest[: opcode.start()])
        ),
        default=0,
    )
    operands = tuple(_OPERAND.findall(arguments))
    return _Instruction(name, dims, result_bytes, opcode.group(1), operands, arguments, attributes)


def parse_computations(hlo_text: str) -> tuple[dict[str, dict[str, _Instruction]], str, dict[str, str]]:
    """HLO text -> ({computation: {instruction: parsed}}, entry computation name, {computation: root name})."""
    computations: dict[str, dict[str, _Instruction]] = {}
    roots: dict[str, str] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = {}
            if header.group(1):
                entry = current
            continue
        if current is None or line.startswith("}"):
            continue
        instruction = _parse_instruction(line)
        if instruction is not None:
            computations[current][instruction.name] = instruction
            if line.lstrip().startswith("ROOT"):
                roots[current] = instruction.name
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry, roots


def _attribute(attributes: str, key: str) -> str | None:
    match = re.search(rf"\b{key}=%?([\w.-]+)", attributes)
    return match.group(1) if match else None


def _matmul_flops(instruction: _Instruction, shapes: dict[str, _Instruction]) -> float:
    if instruction.dims is None:
        return 0.0
    outputs = math.prod(instruction.dims)
    if instruction.opcode == "dot":
        lhs = shapes[instruction.operands[0]].dims
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes).group(1)
        return 2.0 * outputs * math.prod(lhs[int(d)] for d in contracting.split(",") if d)
    return _convolution_flops(instruction, shapes)


def _window_pairs(
    *, size: int, output: int, window: int, stride: int, pad_low: int, lhs_dilation: int, rhs_dilation: int
):
    """How many (output position, window position) pairs of one spatial dimension read a real input element
    (not padding, not a hole of lhs dilation): what XLA's cost analysis counts too."""
    dilated = (size - 1) * lhs_dilation + 1
    if lhs_dilation == 1:
        pairs = 0
        for k in range(window):
            offset = k * rhs_dilation - pad_low  # input index = o * stride + offset, must be in [0, size)
            first = max(0, -(offset // stride))
            last = min(output - 1, (size - 1 - offset) // stride)
            pairs += max(0, last - first + 1)
        return pairs
    return sum(
        1
        for o in range(output)
        for k in range(window)
        if 0 <= (index := o * stride + k * rhs_dilation - pad_low) < dilated and index % lhs_dilation == 0
    )


def _convolution_flops(instruction: _Instruction, shapes: dict[str, _Instruction]) -> float:
    """XLA:TPU writes most matmuls as convolutions, weight gradients often with the contracted dimension as a
    padded window: each output element sums over the kernel's input features (per group) times the window
    positions that read real input."""
    lhs, kernel = (shapes[name].dims for name in instruction.operands[:2])
    lhs_labels, kernel_labels, out_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes).groups()
    spatial = [label for label in out_labels if label.isdigit()]
    window = re.search(r"window=\{([^}]*)\}", instruction.attributes)
    fields = dict(item.split("=") for item in window.group(1).split()) if window else {}

    def per_dim(key: str, default: int) -> list[int]:
        return [int(x) for x in fields[key].split("x")] if key in fields else [default] * len(spatial)

    pads = [[int(x) for x in pad.split("_")] for pad in fields["pad"].split("x")] if "pad" in fields else []
    pairs = math.prod(
        _window_pairs(
            size=lhs[lhs_labels.index(label)],
            output=instruction.dims[out_labels.index(label)],
            window=kernel[kernel_labels.index(label)],
            stride=stride,
            pad_low=pads[d][0] if pads else 0,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
        )
        for d, (label, stride, lhs_dilation, rhs_dilation) in enumerate(
            zip(spatial, per_dim("stride", 1), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1))
        )
    )
    batch, features = instruction.dims[out_labels.index("b")], instruction.dims[out_labels.index("f")]
    return 2.0 * batch * features * pairs * kernel[kernel_labels.index("i")]


def _source(computation: dict[str, _Instruction], name: str) -> _Instruction | None:
    """The instruction that `name` copies (looking through copy / bitcast / convert), or `name` itself."""
    instruction = computation.get(name)
    while instruction is not None and instruction.opcode in ("copy", "bitcast", "convert"):
        instruction = computation.get(instruction.operands[0])
    return instruction


def _tuple_index(instruction: _Instruction | None) -> int | None:
    if instruction is None or instruction.opcode != "get-tuple-element":
        return None
    return int(re.search(r"index=(\d+)", instruction.attributes).group(1))


def _constant(instruction: _Instruction | None) -> int | None:
    if instruction is None or instruction.opcode != "constant":
        return None
    match = re.fullmatch(r"\s*(-?\d+)\s*", instruction.arguments)
    return int(match.group(1)) if match else None


def _trip_count(
    while_op: _Instruction,
    caller: dict[str, _Instruction],
    computations: dict[str, dict[str, _Instruction]],
    roots: dict[str, str],
) -> int | None:
    """ceil((N - start) / step) for a loop `i = start; while i < N: ...; i += step` (how jax lowers scans and
    fori_loops; XLA's collective matmul loops step by 2)."""
    backend = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_op.attributes)
    if backend:
        return int(backend.group(1))
    condition = computations[_attribute(while_op.attributes, "condition")]
    body = computations[_attribute(while_op.attributes, "body")]
    compare = condition[roots[_attribute(while_op.attributes, "condition")]]
    if compare.opcode != "compare" or "direction=LT" not in compare.attributes:
        return None
    counter, limit = (_source(condition, name) for name in compare.operands)
    index, bound = _tuple_index(counter), _constant(limit)
    if index is None or bound is None:
        return None
    # the counter's step: element `index` of the body's result must be `counter + step`
    body_root = body[roots[_attribute(while_op.attributes, "body")]]
    increment = _source(body, body_root.operands[index]) if body_root.opcode == "tuple" else None
    if increment is None or increment.opcode != "add":
        return None
    summands = [_source(body, name) for name in increment.operands]
    steps = [_constant(x) for x in summands if _tuple_index(x) != index]
    if len(steps) != 1 or steps[0] is None or steps[0] <= 0 or [_tuple_index(x) for x in summands].count(index) != 1:
        return None
    # and its start: element `index` of the loop's initial tuple
    initial = _source(caller, while_op.operands[0])
    if initial is None or initial.opcode != "tuple":
        return None
    start = _constant(_source(caller, initial.operands[index]))
    return None if start is None else max(-(-(bound - start) // steps[0]), 0)


def count_flops(hlo_text: str) -> ProgramFlops:
    """The matmul FLOPs, collective bytes and Pallas kernel calls of one run of the program in `hlo_text`
    (optimised HLO)."""
    computations, entry, roots = parse_computations(hlo_text)

    def visit(name: str, times: int) -> _Tally:
        """What computation `name` does when run `times` times."""
        tally = _Tally()
        instructions = computations[name]
        for instruction in instructions.values():
            if instruction.opcode in ("dot", "convolution"):
                tally.flops += times * _matmul_flops(instruction, instructions)
            elif instruction.opcode in COLLECTIVES:
                tally.collective_bytes += times * instruction.result_bytes
            elif instruction.opcode == "custom-call" and '"tpu_custom_call"' in instruction.attributes:
                tally.calls[re.sub(r"(\.\d+)+$", "", instruction.name)] += times
            elif instruction.opcode == "while":
                trips = _trip_count(instruction, instructions, computations, roots)
                if trips is None:
                    tally.unknown.append(instruction.name)
                    trips = 1
                tally.add(visit(_attribute(instruction.attributes, "body"), times * trips))
            elif instruction.opcode == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", instruction.attributes)
                names = (
                    _OPERAND.findall(branches.group(1))
                    if branches
                    else [_attribute(instruction.attributes, key) for key in ("true_computation", "false_computation")]
                )
                # one branch runs: count the most expensive (its kernel calls and loops only)
                tally.add(max((visit(branch, times) for branch in names), key=lambda part: part.flops))
            elif instruction.opcode in ("fusion", "call", "async-start"):
                callee = _attribute(instruction.attributes, "calls") or _attribute(instruction.attributes, "to_apply")
                if callee in computations:
                    tally.add(visit(callee, times))
        return tally

    tally = visit(entry, 1)
    return ProgramFlops(
        matmul_flops=tally.flops,
        kernel_calls=dict(tally.calls),
        unknown_trip_counts=tally.unknown,
        collective_bytes=tally.collective_bytes,
    )
