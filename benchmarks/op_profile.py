"""Where a program's time goes: a per-op profile of the real train step or decoding program.

Runs the imagenet256 (or `--config`'s) transformer's donated train step
(`train_speed.train_step_runner`) or class-conditional decoding
(`MaskGITPipeline.generate_tokens`, T steps in one program), traces one execution with
`jax.profiler`, and names every executed op after its instruction in the program's optimized
HLO (dumped by XLA for this run): forward or backward, and which part of the model
(projection matmuls, attention matmuls, softmax, GELU, LayerNorm, dtype converts,
copies, optimizer). It prints the time by part and the slowest ops.

Op times are summed over the threads that ran them, so on CPU they can add up to more than
the wall time (XLA runs independent ops side by side), while work that helper threads do
outside any op's event is not counted: much of XLA's own CPU dot (float32 forward programs,
`compile_options`) runs that way in Eigen's pool. The script prints op time over wall time
(at most the CPU count when every core runs ops); compare parts with each other, and
programs with `train_speed.py` and `sample_speed.py`.

  python benchmarks/op_profile.py --program train --dtype bfloat16 --batch 4
  python benchmarks/op_profile.py --program decode --dtype bfloat16 --batch 8 --steps 8
"""

# ruff: noqa: E402 (the allocator relaunch and XLA's dump flag must precede the heavy imports)
import argparse
import collections
import dataclasses
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from maskgit_jax import host_memory

# As `python -m maskgit_jax.main` trains: glibc malloc on huge pages (`host_memory`).
HOST_MALLOC = host_memory.relaunch_with_huge_pages(__name__)

# XLA names a program's module after the jitted function.
MODULE_NAMES = {"train": "train_step", "decode": "_decode_rows"}


def _dump_optimized_hlo() -> str:
    """Asks XLA (through XLA_FLAGS, read when the backend starts) to dump the optimized HLO of
    the profiled programs to a new directory, whose instruction names the trace's ops carry.
    """
    directory = tempfile.mkdtemp(prefix="op_profile_")
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={directory} "
        f"--xla_dump_hlo_module_re=.*({'|'.join(MODULE_NAMES.values())}).*"
    ).strip()
    return directory


# Only when run as a script: importing this module (tests) leaves XLA_FLAGS alone.
DUMP_DIR = _dump_optimized_hlo() if __name__ == "__main__" else ""

import jax
import numpy as np
import sample_speed
import train_speed

# Flax module names of the released transformer's projections (`models.transformer`).
_PROJECTIONS = ("/query/", "/key/", "/value/", "/out/", "/intermediate_output/", "/layer_output/")
_MOVES = {"copy", "transpose", "bitcast", "reshape", "slice", "concatenate", "pad", "broadcast"}
_LEAVES = {"parameter", "constant"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One optimized-HLO instruction: its result shape, source op and opcodes (fused ones)."""

    shape: str
    source: str
    body: frozenset[str]


def parse_hlo(text: str) -> dict[str, Instruction]:
    """Instruction name -> Instruction for every instruction of an optimized HLO module text."""
    computations: dict[str, set[str]] = {}
    # (name, shape, opcode, source op, called computation) of each instruction
    pending: list[tuple[str, str, str, str, str | None]] = []
    current: set[str] | None = None
    header = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(")
    line_re = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(")
    for line in text.splitlines():
        if match := header.match(line):
            current = computations.setdefault(match.group(1), set())
            continue
        if line.startswith("}"):
            current = None
            continue
        match = line_re.match(line)
        if not match or current is None:
            continue
        name, shape, opcode = match.groups()
        current.add(opcode)
        source = re.search(r'op_name="([^"]*)"', line)
        called = re.search(r"calls=%([\w.\-]+)", line)
        pending.append(
            (name, shape, opcode, source.group(1) if source else "", called and called.group(1))
        )
    return {
        name: Instruction(
            shape.split("{")[0],
            source,
            frozenset(computations.get(called, ())) if called else frozenset({opcode}),
        )
        for name, shape, opcode, source, called in pending
    }


def part_of(op: Instruction) -> str:
    """The model part an instruction computes, prefixed with its direction inside the model."""
    source, body = op.source, op.body - _LEAVES
    inside = "MaskedTransformer" in source
    if not source:  # layout copies XLA inserted, with no op of the program behind them
        moves = body <= _MOVES | {"convert"}
        return "XLA-inserted copies and transposes" if moves else "XLA-inserted ops"
    if {"dot", "convolution"} & body:
        if any(name in source for name in _PROJECTIONS) and "_ln/" not in source:
            part = "projection matmuls"
        elif "self_attention" in source:
            part = "attention matmuls (+ fused softmax)"
        elif inside:
            part = "output head matmuls"
        else:
            part = "matmuls outside the transformer"
    elif {"tanh", "erf"} & body:
        part = "MLP GELU"
    elif "_ln/" in source:
        part = "LayerNorm"
    elif "self_attention" in source and not body <= _MOVES | {"convert"}:
        part = "attention softmax and dropout"
    elif "convert" in body and body <= _MOVES | {"convert"}:
        part = "dtype converts"
    elif body <= _MOVES:
        part = "copies and transposes"
    elif not inside:
        return "outside the transformer (optimizer, loss, sampling)"
    else:
        part = "other elementwise"
    if not inside:
        return f"outside the transformer: {part}"
    return f"{'backward' if 'transpose(jvp(' in source else 'forward'}: {part}"


def op_times(
    trace_dir: str, instructions: dict[str, Instruction]
) -> tuple[dict[str, tuple[int, int]], int]:
    """Instruction name -> (total ns, count) of the traced events that ran it, and the number
    of threads (trace lines) those events ran on.
    """
    files = sorted(Path(trace_dir).rglob("*.xplane.pb"))
    if not files:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}.")
    profile = jax.profiler.ProfileData.from_file(str(files[-1]))
    planes = list(profile.planes)
    # On an accelerator, the device's op events (host planes may repeat the names at launch).
    devices = [plane for plane in planes if plane.name.startswith("/device:")]
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    threads = set()
    for plane in devices or planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in instructions:
                    totals[event.name][0] += event.duration_ns
                    totals[event.name][1] += 1
                    threads.add((plane.name, line.name))
    return {name: (ns, count) for name, (ns, count) in totals.items()}, len(threads)


def _short(source: str) -> str:
    """The op name without the jit/loop prefix and with layer numbers folded."""
    source = re.sub(r"TransformerLayer_\d+", "L", source)
    source = re.sub(r"^jit\([^)]*\)/(while/body/closed_call/)?", "", source)
    return source[-90:]


def main() -> None:
    """Builds the program, traces one run of it and prints the time by part and by op."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--program", choices=sorted(MODULE_NAMES), default="train")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None, help="train 4, decode 8")
    parser.add_argument("--steps", type=int, default=8, help="decoding steps T")
    parser.add_argument("--top", type=int, default=25, help="slowest ops to list")
    parser.add_argument("--config", default=None, help="config file (default: imagenet256)")
    args = parser.parse_args()
    batch = args.batch or (4 if args.program == "train" else 8)
    try:
        _profile(args, batch)
    finally:
        shutil.rmtree(DUMP_DIR, ignore_errors=True)


def _profile(args: argparse.Namespace, batch: int) -> None:
    module = MODULE_NAMES[args.program]
    if args.program == "train":
        run = train_speed.train_step_runner(batch, args.dtype, args.config)
        what = f"train step, batch {batch}"
    else:
        config = train_speed.benchmark_config(batch, args.dtype, args.config)
        pipe = sample_speed.initialised_pipeline(config, devices=jax.devices()[:1])
        labels = np.arange(batch) % config.num_classes
        options = pipe.options(num_steps=args.steps, dtype=args.dtype)

        def run():
            return pipe.generate_tokens(labels, jax.random.PRNGKey(1), options)

        what = f"decoding, batch {batch}, T={args.steps} (one program)"
    for _ in range(2):  # compile, then one run on warm buffers
        jax.block_until_ready(run())
    with tempfile.TemporaryDirectory(prefix="op_trace_") as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        jax.block_until_ready(run())
        wall = time.perf_counter() - start
        jax.profiler.stop_trace()
        dumps = sorted(Path(DUMP_DIR).glob(f"*{module}*after_optimizations.txt"))
        if not dumps:
            raise RuntimeError(f"XLA dumped no optimized HLO for {module} under {DUMP_DIR}.")
        instructions = parse_hlo(dumps[-1].read_text())
        times, threads = op_times(trace_dir, instructions)
    if not times:
        raise RuntimeError(
            f"No traced event carries the name of an instruction of {dumps[-1].name}: the "
            "profiler's or the HLO dump's format may have changed with this jax version."
        )

    total = sum(ns for ns, _ in times.values())
    print(f"devices: {jax.devices()[:1]}; host malloc: {HOST_MALLOC}")
    model = args.config or "imagenet256"
    print(f"{model} transformer {what}, {args.dtype}: {wall:.3f} s wall (traced run)")
    print(f"op time summed over threads: {total / 1e6:.3f} ms in {len(times)} instructions")
    print(
        f"op time / wall time: {total / 1e9 / wall:.2f} (ops on {threads} threads, "
        f"{os.cpu_count()} CPUs here; far below the CPU count: work outside op events)\n"
    )
    parts: collections.Counter[str] = collections.Counter()
    for name, (ns, _) in times.items():
        parts[part_of(instructions[name])] += ns
    print(f"{'part':62s} {'ms':>10s} {'share':>7s}")
    for part, ns in parts.most_common():
        print(f"{part:62s} {ns / 1e6:10.3f} {100 * ns / total:6.1f}%")

    by_op: collections.Counter[tuple[str, str]] = collections.Counter()
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for name, (ns, count) in times.items():
        op = instructions[name]
        key = (op.shape, _short(op.source) or re.sub(r"\.\d+$", "", name))
        by_op[key] += ns
        counts[key] += count
    print(f"\nslowest {args.top} ops (layers folded into L):")
    print(f"{'ms':>9s} {'share':>7s} {'runs':>6s}  shape  op")
    for key, ns in by_op.most_common(args.top):
        print(f"{ns / 1e6:9.1f} {100 * ns / total:6.1f}% {counts[key]:6d}  {key[0]}  {key[1]}")


if __name__ == "__main__":
    main()
