"""Feeding blocks of a shard into a functional state, with errors that name the file.

Shared by `ppl compute` and `ppl parity` on files: the state is grown with
`perplexity_state_update`, one block of rows at a time, so nothing beyond one block (and, for
containers, one shard) is held in memory. The progress bar lives here too.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import Any

from ppl._cli._arrays import is_installed, to_backend
from ppl._cli._errors import CliError
from ppl._cli._files import Block, OpenShard, ReadOptions, Shard, locate_error, open_shard
from ppl.functional import PerplexityState, perplexity_state_update


def iterate_shards(
    shards: Sequence[Shard], options: ReadOptions, progress_mode: str, description: str
) -> Iterator[tuple[OpenShard, Iterator[Block]]]:
    """Yields each shard, opened, with an iterator over its blocks; one shard is open at a time.

    Each shard's blocks must be consumed before the next shard is asked for. The progress bar
    counts the bytes of the files on disk; each block advances it by its share of its shard.
    """
    progress = Progress(
        sum(shard.path.stat().st_size for shard in shards), progress_mode, description
    )
    try:
        for shard in shards:
            opened = open_shard(shard, options)
            yield opened, _blocks_with_progress(opened, shard.path.stat().st_size, progress)
    finally:
        progress.close()


def _blocks_with_progress(
    opened: OpenShard, file_bytes: int, progress: Progress
) -> Iterator[Block]:
    done = 0
    for block in opened.blocks():
        yield block
        advance = file_bytes * block.nbytes // max(1, opened.nbytes)
        progress.update(advance)
        done += advance
    progress.update(file_bytes - done)


def update_with_block(
    state: PerplexityState, block: Block, backend: str, kind: str, source: str
) -> tuple[PerplexityState, set[str]]:
    """Returns `state` with the block's distributions added, and the notes of its conversion.

    Args:
        state: a state of `backend`.
        block: the block, as read from the file.
        backend: `"numpy"`, `"torch"` or `"jax"`.
        kind: `"logits"` or `"probs"`.
        source: the file (and key) the block comes from, for error messages.

    Raises:
        CliError: the library refused the values (NaN logits, negative probs...); the message is
            the library's, with the index given in the file's own axes.
    """
    values, note = to_backend(block.values, backend)
    mask = None if block.mask is None else to_backend(block.mask, backend)[0]
    try:
        state = perplexity_state_update(state, mask=mask, **{kind: values})
    except (ValueError, TypeError) as error:
        raise CliError(f"{source}: {locate_error(str(error), block)}") from None
    return state, set() if note is None else {note}


def state_count(state: PerplexityState) -> int:
    """The number of distributions in a state, as a Python int (both count words)."""
    return int(state.num_distributions) + int(state.num_distributions_high) * 2**32


class Progress:
    """A tqdm bar over bytes on stderr, or nothing.

    Args:
        total_bytes: the size of all the input files.
        mode: `"auto"` (a bar when stderr is a terminal, shown once the work has taken a second),
            `"always"` or `"never"`.
        description: the bar's label.
    """

    def __init__(self, total_bytes: int, mode: str, description: str) -> None:
        self._bar: Any = None
        if mode == "never" or (mode == "auto" and not sys.stderr.isatty()):
            return
        if not is_installed("tqdm"):
            if mode == "always":
                print("ppl: note: tqdm is not installed; no progress bar", file=sys.stderr)
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            desc=description,
            delay=1.0 if mode == "auto" else 0.0,
            leave=False,
        )

    def update(self, num_bytes: int) -> None:
        if self._bar is not None:
            self._bar.update(num_bytes)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
