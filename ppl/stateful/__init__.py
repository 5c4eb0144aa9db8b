"""Stateful perplexity for PyTorch training loops: a metric module, its sync, and Lightning.

`Perplexity` is a `torch.nn.Module` that needs nothing beyond torch; `sync_state` sums a functional
torch state over a `torch.distributed` group with one collective; `TorchmetricsPerplexity` is a
torchmetrics `Metric` that stands in for NeMo's class in Lightning. Importing this package imports
torch, but neither torchmetrics nor lightning: `TorchmetricsPerplexity` is loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ppl.stateful._metric import Perplexity
from ppl.stateful._sync import SyncError, SyncTimeoutError, sync_state

if TYPE_CHECKING:
    from ppl.stateful._torchmetrics import TorchmetricsPerplexity

__all__ = [
    "Perplexity",
    "SyncError",
    "SyncTimeoutError",
    "TorchmetricsPerplexity",
    "sync_state",
]


def __getattr__(name: str) -> Any:
    if name == "TorchmetricsPerplexity":
        from ppl.stateful._torchmetrics import TorchmetricsPerplexity

        return TorchmetricsPerplexity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
