"""`python -m ppl` and the `ppl` console script; see `ppl --help`.

With no arguments it runs `ppl parity`: seeded cases through every installed backend, each against
a float64 reference, printed as a table.
"""

import sys

from ppl._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
