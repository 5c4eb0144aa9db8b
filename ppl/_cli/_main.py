"""Argument parsing and exit statuses of the `ppl` command.

Exit statuses: 0 success; 1 `ppl parity` found a difference above `--rtol`; 2 bad usage or bad
input (a missing, truncated, pickled or mistyped file, invalid values, a backend not installed),
always as one line `ppl: error: ...` on stderr, never a traceback; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ppl import __version__
from ppl._cli._errors import CliError
from ppl._cli._files import DEFAULT_BLOCK_BYTES

_DESCRIPTION = """\
Perplexity of predicted distributions, identical on NumPy, PyTorch and JAX.

  ppl                       same as `ppl parity`: seeded cases through every installed backend
  ppl parity [FILE ...]     the table of each backend against a float64 reference
  ppl compute FILE ...      the perplexity of logits or probs stored in files

Exit status: 0 success, 1 parity beyond --rtol, 2 bad usage or bad input.
"""

_INPUT_HELP = """\
FILEs are .npy (memory-mapped), .npz, .pt/.pth or .safetensors; a directory stands for the
supported files directly inside it, sorted by name. Each holds an array of shape [..., vocab];
every position of the leading axes is one distribution. Containers: --key picks the array (by
default the only one, or the one named `logits` / `probs`). Masks: --mask gives one mask file per
input file, paired in order (files or directories, expanded the same way), or --mask-key names the
mask inside each container; a mask is boolean (or integer 0/1) of shape [...]."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `ppl` command; returns its exit status.

    Args:
        argv: the arguments without the program's name; `sys.argv[1:]` when None.

    Returns:
        0 on success, 1 when `ppl parity` finds a difference above `--rtol`, 2 for bad usage or
        bad input, 130 when interrupted.

    Example:
        >>> main(["parity", "--backend", "numpy", "--json"])  # doctest: +SKIP
        0
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    # No subcommand (nothing, or options only) means `parity`.
    if not arguments or (
        arguments[0].startswith("-") and arguments[0] not in ("-h", "--help", "--version")
    ):
        arguments.insert(0, "parity")
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else 2

    try:
        if args.command == "compute":
            from ppl._cli._compute import run_compute

            return run_compute(args)
        from ppl._cli._parity import run_parity

        return run_parity(args)
    except CliError as error:
        print(f"ppl: error: {error}", file=sys.stderr)
        return 2
    except MemoryError:
        print("ppl: error: out of memory (try a smaller --block-bytes)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ppl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`ppl ... | head`): nothing left to say.
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The parser of `ppl` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="ppl", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"ppl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{parity,compute}")

    parity = commands.add_parser(
        "parity",
        help="every installed backend against a float64 reference (the default)",
        description=(
            "Without FILEs: seeded cases (peaked, flat, -inf-masked vocabulary, bfloat16, a\n"
            "padded batch, float64 probs with zeros, and NeMo's test cases) through NumPy,\n"
            "PyTorch and JAX (x64 off and on), each against a float64 reference. With FILEs:\n"
            "the same on your data. Exit status 1 when a relative difference exceeds --rtol.\n\n"
            + _INPUT_HELP
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parity.add_argument("files", nargs="*", metavar="FILE", help="inputs (default: the cases)")
    parity.add_argument(
        "--rtol",
        type=float,
        default=1e-5,
        help="largest relative difference that passes (default 1e-5)",
    )
    parity.add_argument(
        "--backend",
        action="append",
        choices=("numpy", "torch", "jax", "jax-x64"),
        help="run only this backend (repeatable; default: every installed one)",
    )
    _add_input_arguments(parity)

    compute = commands.add_parser(
        "compute",
        help="the perplexity of logits or probs stored in files",
        description=(
            "The mean perplexity over every distribution in the FILEs, streamed shard by shard\n"
            "and block by block into one state.\n\n" + _INPUT_HELP
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compute.add_argument("files", nargs="+", metavar="FILE", help="inputs")
    compute.add_argument(
        "--backend",
        choices=("numpy", "torch", "jax"),
        default="numpy",
        help="backend to compute with (default numpy; jax runs with x64 on)",
    )
    _add_input_arguments(compute)
    return parser


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--logits", action="store_true", help="the files hold logits (the default)")
    kind.add_argument(
        "--probs",
        action="store_true",
        help="the files hold probabilities (non-negative weights, normalised by their sum)",
    )
    parser.add_argument("--key", help="name of the array inside .npz/.pt/.safetensors files")
    parser.add_argument(
        "--mask",
        action="append",
        metavar="PATH",
        help="mask file or directory, one mask file per input file (repeatable)",
    )
    parser.add_argument("--mask-key", metavar="KEY", help="name of the mask inside container files")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const="always",
        default="auto",
        help="always show a progress bar (tqdm, on stderr); by default one appears on a "
        "terminal once the work takes over a second",
    )
    progress.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const="never",
        help="never show a progress bar",
    )
    parser.add_argument(
        "--block-bytes",
        type=_positive_int,
        default=DEFAULT_BLOCK_BYTES,
        metavar="N",
        help=f"bytes of input handed to the backend at a time (default {DEFAULT_BLOCK_BYTES})",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return value
