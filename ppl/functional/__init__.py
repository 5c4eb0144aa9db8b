"""Pure functions for perplexity that behave the same on NumPy arrays, torch tensors and JAX arrays.

A state is created with `perplexity_state_init`, grown with `perplexity_state_update`, combined
with `perplexity_state_merge` and turned into a value with `perplexity_compute`; `perplexity` does
all of it at once. The backend is chosen from the type of the arrays passed in.
"""

from ppl.functional._psum import perplexity_state_psum
from ppl.functional._state import (
    PerplexityState,
    perplexity_compute,
    perplexity_state_init,
    perplexity_state_merge,
)
from ppl.functional._update import perplexity, perplexity_state_update

__all__ = [
    "PerplexityState",
    "perplexity",
    "perplexity_compute",
    "perplexity_state_init",
    "perplexity_state_merge",
    "perplexity_state_psum",
    "perplexity_state_update",
]
