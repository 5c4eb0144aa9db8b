"""The `ppl` command line: `ppl parity` and `ppl compute` (private; run it as `python -m ppl`).

`_main` parses the arguments and turns every expected failure into one line on stderr; `_files`
finds and safely reads the user's files; `_arrays` converts arrays between NumPy, PyTorch and JAX;
`_parity` and `_compute` are the two subcommands; `_output` formats their tables.
"""

from ppl._cli._main import main

__all__ = ["main"]
