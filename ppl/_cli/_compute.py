"""`ppl compute`: the perplexity of the distributions stored in the user's files.

The shards are streamed: one shard is open at a time and it is fed to one functional state in
blocks of rows, so a directory of many shards, or one `.npy` larger than memory, never has to fit.
On the JAX backend the command turns on x64, so that the state is float64 and int64 as on the
other backends and float64 inputs are computed in float64.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from ppl._cli._arrays import framework_version, import_optional, set_jax_x64
from ppl._cli._feed import iterate_shards, state_count, update_with_block
from ppl._cli._files import ReadOptions, find_shards, pair_masks
from ppl._cli._output import dumps, finite_or_none, format_value
from ppl.functional import perplexity_compute, perplexity_state_init


def run_compute(args: argparse.Namespace) -> int:
    """Runs `ppl compute`; returns the exit status (0), or raises `CliError` (status 2)."""
    backend = args.backend
    if backend != "numpy":
        import_optional(backend, f"--backend {backend}")
    if backend == "jax":
        set_jax_x64(True)
    options = read_options(args)
    shards = pair_masks(
        find_shards(args.files, "input"),
        None if args.mask is None else find_shards(args.mask, "--mask"),
    )

    state = perplexity_state_init(backend)
    files: list[dict[str, Any]] = []
    notes: set[str] = set()
    for opened, blocks in iterate_shards(shards, options, args.progress, "ppl compute"):
        before = state_count(state)
        for block in blocks:
            state, block_notes = update_with_block(
                state, block, backend, options.kind, opened.source
            )
            notes |= block_notes
        files.append(
            {
                "path": str(opened.path),
                "key": opened.key,
                "mask": opened.mask_source,
                "shape": list(opened.shape),
                "dtype": opened.dtype,
                "num_distributions": state_count(state) - before,
            }
        )

    value = float(perplexity_compute(state))
    count = state_count(state)
    version = "" if backend == "numpy" else framework_version(backend)
    if args.json:
        print(
            dumps(
                {
                    "command": "compute",
                    "perplexity": finite_or_none(value),
                    "num_distributions": count,
                    "input": options.kind,
                    "backend": backend,
                    "backend_version": version or framework_version("numpy"),
                    "num_files": len(shards),
                    "files": files,
                    "notes": sorted(notes),
                }
            )
        )
    else:
        print(f"perplexity     {format_value(value)}")
        print(f"distributions  {count}")
        print(f"input          {options.kind}, {len(shards)} file(s)")
        print(f"backend        {backend} {version or framework_version('numpy')}")
        for note in sorted(notes):
            print(f"note           {note}")
    if math.isnan(value):
        print(
            "ppl: note: no distribution was counted (every one masked out, or no rows); "
            "the perplexity is undefined",
            file=sys.stderr,
        )
    return 0


def read_options(args: argparse.Namespace) -> ReadOptions:
    """The reading options shared by `compute` and `parity` on files."""
    return ReadOptions(
        kind="probs" if args.probs else "logits",
        key=args.key,
        mask_key=args.mask_key,
        use_mask=args.mask is not None or args.mask_key is not None,
        block_bytes=args.block_bytes,
    )
