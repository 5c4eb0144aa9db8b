"""ppl: exact, fast perplexity of predicted distributions on NumPy, PyTorch and JAX.

Importing `ppl` imports neither torch nor JAX; a backend is chosen from the arrays passed in.
"""

from ppl.functional import (
    PerplexityState,
    perplexity,
    perplexity_compute,
    perplexity_state_init,
    perplexity_state_merge,
    perplexity_state_psum,
    perplexity_state_update,
)

__version__ = "0.1.0"

__all__ = [
    "PerplexityState",
    "__version__",
    "perplexity",
    "perplexity_compute",
    "perplexity_state_init",
    "perplexity_state_merge",
    "perplexity_state_psum",
    "perplexity_state_update",
]
