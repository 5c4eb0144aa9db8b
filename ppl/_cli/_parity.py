"""`ppl parity`: every installed backend against a float64 reference, on seeded cases or files.

Backends: NumPy always; PyTorch and JAX where installed. JAX runs twice, as `jax` with x64 off (its
default: float32 state kept exact by compensated addition, float64 inputs computed in float32)
and as `jax-x64`. The reference (`ppl._reference`) is written from the definition in float64,
apart from the kernels. For bfloat16 inputs it is the reference of the bfloat16 values themselves,
so a difference measures ppl, not bfloat16 rounding. The exit status is 1 when any relative
difference exceeds `--rtol` (or a backend failed on a case), so the command can gate a CI job.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ppl._cases import Case, embedded_cases, round_to_bfloat16
from ppl._cli._arrays import (
    bfloat16_from_bits,
    framework_version,
    import_optional,
    is_installed,
    set_jax_x64,
    to_backend,
    to_numpy,
)
from ppl._cli._compute import read_options
from ppl._cli._errors import CliError
from ppl._cli._feed import iterate_shards, update_with_block
from ppl._cli._files import find_shards, pair_masks
from ppl._cli._output import (
    dumps,
    finite_or_none,
    format_diff,
    format_seconds,
    format_table,
    format_value,
)
from ppl._reference import ReferencePerplexity
from ppl.functional import perplexity_compute, perplexity_state_init, perplexity_state_update

RUNNERS = ("numpy", "torch", "jax", "jax-x64")

BFLOAT16_NOTE = (
    "bf16: the reference is the float64 perplexity of the bfloat16-rounded input, so the "
    "difference measures ppl, not bfloat16 rounding"
)
BFLOAT16_FILES_NOTE = (
    "bf16: the reference is the float64 perplexity of the bfloat16 values as stored"
)


@dataclass(frozen=True)
class Runner:
    """A backend as parity runs it: `jax` and `jax-x64` are one framework in two modes."""

    name: str
    backend: str
    x64: bool = False

    def activate(self) -> None:
        if self.backend == "jax":
            set_jax_x64(self.x64)


@dataclass
class Result:
    """One row of the table."""

    case: str
    runner: str
    input_dtype: str
    reference: float
    value: float = math.nan
    seconds: float = 0.0
    notes: set[str] = field(default_factory=set)
    error: str | None = None

    @property
    def abs_diff(self) -> float:
        if math.isnan(self.value) and math.isnan(self.reference):
            return 0.0
        return abs(self.value - self.reference)

    @property
    def rel_diff(self) -> float:
        if self.error is not None:
            return math.inf
        difference = self.abs_diff
        if difference == 0:
            return 0.0
        return difference / abs(self.reference) if self.reference != 0 else math.inf

    def passed(self, rtol: float) -> bool:
        rel_diff = self.rel_diff
        return self.error is None and not math.isnan(rel_diff) and rel_diff <= rtol


def run_parity(args: argparse.Namespace) -> int:
    """Runs `ppl parity`; returns 0 (all within `--rtol`) or 1, or raises `CliError` (2)."""
    if not args.rtol >= 0:
        raise CliError(f"--rtol must be a non-negative number; got {args.rtol}")
    runners, skipped = select_runners(args.backend)
    if args.files:
        results, description = _parity_on_files(args, runners)
    else:
        if args.mask is not None or args.key is not None or args.mask_key is not None:
            raise CliError("--key, --mask and --mask-key apply to files; give FILE arguments")
        cases = embedded_cases()
        results = [result for case in cases for result in _parity_on_case(case, runners)]
        description = f"{len(cases)} embedded cases (seeded)"

    passed = all(result.passed(args.rtol) for result in results)
    largest = max((result.rel_diff for result in results), default=0.0)
    notes = _notes(results, bool(args.files))
    if args.json:
        print(dumps(_document(args, description, runners, skipped, results, notes, passed)))
    else:
        print(_report(args.rtol, description, runners, skipped, results, notes, passed, largest))
    return 0 if passed else 1


def select_runners(requested: list[str] | None) -> tuple[list[Runner], list[str]]:
    """The runners to use, and the names of those skipped because not installed.

    Raises:
        CliError: a backend asked for with `--backend` is not installed.
    """
    names = list(dict.fromkeys(requested)) if requested else list(RUNNERS)
    runners, skipped = [], []
    for name in names:
        framework = name.removesuffix("-x64")
        if framework != "numpy" and not is_installed(framework):
            if requested:
                import_optional(framework, f"--backend {name}")
            skipped.append(name)
            continue
        if framework != "numpy":
            import_optional(framework, f"the {name} backend")
        runners.append(Runner(name, framework, x64=name.endswith("-x64")))
    return runners, skipped


def _parity_on_case(case: Case, runners: list[Runner]) -> list[Result]:
    reference = ReferencePerplexity()
    for batch in case.batches:
        reference.update(batch.values, case.kind, batch.mask)
    dtype = "bfloat16" if case.bfloat16 else str(case.batches[0].values.dtype)
    results = []
    for runner in runners:
        result = Result(case.name, runner.name, dtype, reference.value())
        try:
            runner.activate()
            inputs = []
            for batch in case.batches:
                if case.bfloat16:
                    values, note = bfloat16_from_bits(
                        round_to_bfloat16(batch.values), runner.backend
                    )
                else:
                    values, note = to_backend(batch.values, runner.backend)
                mask = None if batch.mask is None else to_backend(batch.mask, runner.backend)[0]
                inputs.append((values, mask))
                if note is not None:
                    result.notes.add(note)
            # The first run compiles (JAX) and warms caches; the second is timed.
            _run_updates(runner, case.kind, inputs)
            start = time.perf_counter()
            result.value = _run_updates(runner, case.kind, inputs)
            result.seconds = time.perf_counter() - start
        except Exception as error:
            # A backend failing on a valid case is a parity failure, reported, not a crash.
            result.error = f"{type(error).__name__}: {' '.join(str(error).split())}"
        results.append(result)
    return results


def _run_updates(runner: Runner, kind: str, inputs: list[tuple[Any, Any]]) -> float:
    state = perplexity_state_init(runner.backend)
    for values, mask in inputs:
        state = perplexity_state_update(state, mask=mask, **{kind: values})
    return float(perplexity_compute(state))


def _parity_on_files(args: argparse.Namespace, runners: list[Runner]) -> tuple[list[Result], str]:
    options = read_options(args)
    shards = pair_masks(
        find_shards(args.files, "input"),
        None if args.mask is None else find_shards(args.mask, "--mask"),
    )
    reference = ReferencePerplexity()
    states: dict[str, Any] = {}
    for runner in runners:
        runner.activate()
        states[runner.name] = perplexity_state_init(runner.backend)
    seconds = dict.fromkeys(states, 0.0)
    notes: dict[str, set[str]] = {name: set() for name in states}
    dtypes: set[str] = set()

    for opened, blocks in iterate_shards(shards, options, args.progress, "ppl parity"):
        dtypes.add(opened.dtype)
        for block in blocks:
            host_values, _ = to_numpy(block.values)
            host_mask = None if block.mask is None else to_numpy(block.mask)[0]
            reference.update(host_values, options.kind, host_mask)
            for runner in runners:
                runner.activate()
                start = time.perf_counter()
                states[runner.name], block_notes = update_with_block(
                    states[runner.name], block, runner.backend, options.kind, opened.source
                )
                seconds[runner.name] += time.perf_counter() - start
                notes[runner.name] |= block_notes

    label = str(shards[0].path) if len(shards) == 1 else f"{len(shards)} files"
    dtype = "/".join(sorted(dtypes)) or "-"
    results = []
    for runner in runners:
        runner.activate()
        start = time.perf_counter()
        value = float(perplexity_compute(states[runner.name]))
        elapsed = seconds[runner.name] + time.perf_counter() - start
        results.append(
            Result(label, runner.name, dtype, reference.value(), value, elapsed, notes[runner.name])
        )
    description = f"{len(shards)} file(s), {options.kind}, {reference.num_distributions} "
    description += "distributions"
    return results, description


def _notes(results: list[Result], on_files: bool) -> list[str]:
    notes = []
    if any("bfloat16" in result.input_dtype for result in results):
        notes.append(BFLOAT16_FILES_NOTE if on_files else BFLOAT16_NOTE)
    by_note: dict[str, list[str]] = {}
    for result in results:
        for note in sorted(result.notes):
            by_note.setdefault(f"{result.runner}: {note}", []).append(result.case)
    for note, cases in by_note.items():
        notes.append(note if on_files else f"{note} [{', '.join(dict.fromkeys(cases))}]")
    if on_files:
        notes.append("time: conversion excluded; includes JAX compilation on each new shape")
    else:
        notes.append("time: the updates and compute of one run after a warm-up (JAX compiles)")
    return notes


def _versions(runners: list[Runner]) -> str:
    seen = dict.fromkeys(runner.backend for runner in runners)
    return ", ".join(f"{name} {framework_version(name)}" for name in seen)


def _report(
    rtol: float,
    description: str,
    runners: list[Runner],
    skipped: list[str],
    results: list[Result],
    notes: list[str],
    passed: bool,
    largest: float,
) -> str:
    headers = ["case", "backend", "dtype", "value", "reference", "abs diff", "rel diff", "time", ""]
    rows = []
    for result in results:
        if result.error is not None:
            rows.append(
                [result.case, result.runner, result.input_dtype, "error", "", "", "", "", "FAIL"]
            )
            continue
        rows.append(
            [
                result.case,
                result.runner,
                result.input_dtype,
                format_value(result.value),
                format_value(result.reference),
                format_diff(result.abs_diff),
                format_diff(result.rel_diff),
                format_seconds(result.seconds),
                "" if result.passed(rtol) else "FAIL",
            ]
        )
    lines = [
        f"ppl parity: {description}; rtol {rtol:g}",
        f"backends: {_versions(runners)}"
        + (
            " (jax: x64 off, its default; jax-x64: x64 on)"
            if any(r.backend == "jax" for r in runners)
            else ""
        ),
    ]
    if skipped:
        lines.append(f"skipped (not installed): {', '.join(skipped)}")
    lines += ["", format_table(headers, rows, right={5, 6, 7}), ""]
    for result in results:
        if result.error is not None:
            lines.append(f"error: {result.case} on {result.runner}: {result.error}")
    lines += [f"note: {note}" for note in notes]
    failed = sum(not result.passed(rtol) for result in results)
    if passed:
        lines.append(f"PASS: largest relative difference {format_diff(largest)} <= rtol {rtol:g}")
    else:
        lines.append(
            f"FAIL: {failed} of {len(results)} results exceed rtol {rtol:g} "
            f"(largest relative difference {format_diff(largest)})"
        )
    return "\n".join(lines)


def _document(
    args: argparse.Namespace,
    description: str,
    runners: list[Runner],
    skipped: list[str],
    results: list[Result],
    notes: list[str],
    passed: bool,
) -> dict[str, Any]:
    largest = max((result.rel_diff for result in results), default=0.0)
    return {
        "command": "parity",
        "source": "files" if args.files else "embedded",
        "description": description,
        "rtol": args.rtol,
        "passed": passed,
        "max_rel_diff": finite_or_none(largest),
        "backends": [
            {
                "name": runner.name,
                "framework": runner.backend,
                "version": framework_version(runner.backend),
                "x64": runner.x64 if runner.backend == "jax" else None,
            }
            for runner in runners
        ],
        "skipped": skipped,
        "results": [
            {
                "case": result.case,
                "backend": result.runner,
                "input_dtype": result.input_dtype,
                "value": finite_or_none(result.value),
                "reference": finite_or_none(result.reference),
                "abs_diff": finite_or_none(result.abs_diff),
                "rel_diff": finite_or_none(result.rel_diff),
                "seconds": result.seconds,
                "passed": result.passed(args.rtol),
                "notes": sorted(result.notes),
                "error": result.error,
            }
            for result in results
        ],
        "notes": notes,
    }
