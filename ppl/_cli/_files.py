"""Finding the user's shards, reading them safely, and cutting them into blocks of rows.

Formats: `.npy` (memory-mapped, so a file larger than memory is read block by block), `.npz`,
`.pt` / `.pth` (torch, memory-mapped where the file allows) and `.safetensors`. A directory stands
for the supported files directly inside it, in sorted order of their names. Nothing is unpickled:
NumPy reads with `allow_pickle=False`, torch with `weights_only=True`, safetensors with its own
loader. Every failure becomes a `CliError` naming the file and the problem.

Masks: `--mask PATH` (repeatable; files or directories, expanded the same way) gives one mask
shard for each input shard, paired in order; `--mask-key KEY` names the mask inside a container,
the `--mask` file's or, without `--mask`, the input file's own. A mask is boolean, or integer
holding only 0 and 1, of shape `input.shape[:-1]`.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ppl._cli._arrays import dtype_name, import_optional, is_installed, is_torch_tensor
from ppl._cli._errors import CliError

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

# Bytes of input handed to a backend at a time: bounds the memory of a memory-mapped read.
DEFAULT_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class Shard:
    """One input file and the file its mask comes from (None: no mask, or the file itself)."""

    path: Path
    mask_path: Path | None = None


@dataclass(frozen=True)
class ReadOptions:
    """How to read each shard.

    Attributes:
        kind: `"logits"` or `"probs"`.
        key: the array's name inside a container, or None to pick it (see `_select`).
        mask_key: the mask's name inside a container, or None.
        use_mask: whether any mask was asked for.
        block_bytes: at most this many bytes of input per block (one row at least).
    """

    kind: str
    key: str | None = None
    mask_key: str | None = None
    use_mask: bool = False
    block_bytes: int = DEFAULT_BLOCK_BYTES


@dataclass(frozen=True)
class Block:
    """Consecutive distributions of one shard, ready for `perplexity_state_update`.

    Attributes:
        values: NumPy array or torch tensor, `[rows, vocab]` when `flat` is True, else a slice of
            the input along its first axis.
        mask: boolean array matching `values.shape[:-1]`, or None.
        first: the first flat row (when `flat`) or first index on axis 0 of the block.
        flat: whether the leading axes were flattened into rows.
        leading_shape: the shard's shape without its last axis.
        nbytes: bytes of input in the block.
    """

    values: Any
    mask: Any
    first: int
    flat: bool
    leading_shape: tuple[int, ...]
    nbytes: int


@dataclass
class OpenShard:
    """A shard whose array (and mask) are open and checked, read block by block."""

    path: Path
    key: str | None
    values: Any
    mask: Any
    mask_source: str | None
    block_bytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(size) for size in self.values.shape)

    @property
    def dtype(self) -> str:
        return dtype_name(self.values)

    @property
    def source(self) -> str:
        """The file, and the key inside it, for messages."""
        return _describe(self.path, self.key)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.values)

    def blocks(self) -> Iterator[Block]:
        """Yields the shard's blocks in order; each is at most `block_bytes` unless one row is
        larger."""
        values, mask = self.values, self.mask
        shape = self.shape
        leading_shape, vocab = shape[:-1], shape[-1]
        itemsize = _itemsize(values)
        if values.ndim == 1 or _is_c_contiguous(values):
            rows = values.reshape(-1, vocab)
            flat_mask = None if mask is None else mask.reshape(-1)
            step = max(1, self.block_bytes // (vocab * itemsize))
            for first in range(0, rows.shape[0], step):
                block = rows[first : first + step]
                block_mask = None if flat_mask is None else flat_mask[first : first + step]
                yield Block(
                    block,
                    _as_bool_mask(block_mask, self.mask_source),
                    first,
                    True,
                    leading_shape,
                    int(block.shape[0]) * vocab * itemsize,
                )
            return
        # A non-C-ordered array (Fortran order) cannot be flattened without a full copy.
        per_index = math.prod(shape[1:]) * itemsize
        step = max(1, self.block_bytes // max(per_index, 1))
        for first in range(0, shape[0], step):
            block = values[first : first + step]
            block_mask = None if mask is None else mask[first : first + step]
            yield Block(
                block,
                _as_bool_mask(block_mask, self.mask_source),
                first,
                False,
                leading_shape,
                int(block.shape[0]) * per_index,
            )


def find_shards(paths: Sequence[str], argument: str) -> list[Path]:
    """Expands files and directories into the list of shard files, in order.

    Args:
        paths: what the user gave; a directory stands for its supported files, sorted by name.
        argument: how to name these paths in an error (`"input"`, `"--mask"`).

    Returns:
        The shard paths.

    Raises:
        CliError: a path that does not exist, a file of an unsupported type, or a directory with
            no supported file.
    """
    shards: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = sorted(
                child
                for child in path.iterdir()
                if child.is_file()
                and not child.name.startswith(".")
                and child.suffix.lower() in SUFFIXES
            )
            if not inside:
                raise CliError(
                    f"{given}: directory holds no {', '.join(SUFFIXES)} file (given as {argument})"
                )
            shards.extend(inside)
        elif path.exists():
            if path.suffix.lower() not in SUFFIXES:
                raise CliError(
                    f"{given}: unsupported file type {path.suffix or '(no suffix)'!r}; "
                    f"expected one of {', '.join(SUFFIXES)}"
                )
            shards.append(path)
        else:
            raise CliError(f"{given}: no such file or directory")
    return shards


def pair_masks(inputs: list[Path], masks: list[Path] | None) -> list[Shard]:
    """Pairs input shards with mask shards, in order; raises `CliError` when their counts differ."""
    if masks is None:
        return [Shard(path) for path in inputs]
    if len(masks) != len(inputs):
        raise CliError(
            f"--mask gives {len(masks)} mask file(s) but the inputs are {len(inputs)} file(s); "
            f"give one mask file per input file, in the same order"
        )
    return [Shard(path, mask) for path, mask in zip(inputs, masks, strict=True)]


def open_shard(shard: Shard, options: ReadOptions) -> OpenShard:
    """Opens a shard's array and mask and checks their dtypes and shapes.

    Raises:
        CliError: the file cannot be read safely, holds no suitable array, or the mask does not
            match.
    """
    values, key = read_array(shard.path, options.key, options.kind)
    _check_values(values, shard.path, key, options.kind)
    mask = None
    mask_source = None
    if options.use_mask:
        # Without --mask, `use_mask` means --mask-key: the mask is inside the input file.
        mask_path = shard.mask_path or shard.path
        mask, mask_key = read_array(mask_path, options.mask_key, "mask")
        mask_source = _describe(mask_path, mask_key)
        _check_mask(mask, mask_source, values, _describe(shard.path, key), options.kind)
    return OpenShard(shard.path, key, values, mask, mask_source, options.block_bytes)


def read_array(path: Path, key: str | None, wanted: str) -> tuple[Any, str | None]:
    """Returns the array stored in `path` (NumPy, or torch for `.pt`) and the key it was under.

    Args:
        path: a `.npy`, `.npz`, `.pt`, `.pth` or `.safetensors` file.
        key: the name inside a container; None picks the only array, else the one named `wanted`.
        wanted: `"logits"`, `"probs"` or `"mask"`, the default key and the name used in errors.

    Raises:
        CliError: the file is missing, truncated, corrupt, holds pickled objects, or has no such
            key.
    """
    suffix = path.suffix.lower()
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    if suffix == ".npy":
        if key is not None:
            raise CliError(
                f"{path}: a .npy file holds one array; --key/--mask-key apply to "
                f"containers (.npz, .pt, .safetensors)"
            )
        return _read_npy(path), None
    if suffix == ".npz":
        return _read_npz(path, key, wanted)
    if suffix in (".pt", ".pth"):
        return _read_torch(path, key, wanted)
    if suffix == ".safetensors":
        return _read_safetensors(path, key, wanted)
    raise CliError(f"{path}: unsupported file type {suffix!r}; expected one of {SUFFIXES}")


def locate_error(message: str, block: Block) -> str:
    """Rewrites a library message's `at index (...)` from the block's indices to the shard's."""
    match = re.search(r"at index \(([^)]*)\)", message)
    if match is None:
        return message
    try:
        index = [int(part) for part in match.group(1).replace(",", " ").split()]
    except ValueError:
        return message
    if not index:
        return message
    if block.flat:
        # Block indices are (row, column) of the flattened rows; the shard's are its own axes.
        row, column = index[0] + block.first, index[1:]
        leading = np.unravel_index(row, block.leading_shape) if block.leading_shape else ()
        position = tuple(int(i) for i in leading) + tuple(column)
    else:
        position = (index[0] + block.first, *index[1:])
    text = "(" + ", ".join(str(i) for i in position) + ("," if len(position) == 1 else "") + ")"
    return message[: match.start()] + f"at index {text}" + message[match.end() :]


def _describe(path: Path, key: str | None) -> str:
    return str(path) if key is None else f"{path}[{key!r}]"


def _itemsize(array: Any) -> int:
    if is_torch_tensor(array):
        return int(array.element_size())
    return int(array.dtype.itemsize)


def _is_c_contiguous(array: Any) -> bool:
    if is_torch_tensor(array):
        return bool(array.is_contiguous())
    return bool(array.flags.c_contiguous)


def _pickled(path: Path, reader: str) -> CliError:
    return CliError(
        f"{path}: holds pickled Python objects, which are not read (files are loaded with "
        f"{reader}); save plain arrays or tensors"
    )


def _corrupt(path: Path, what: str, error: BaseException) -> CliError:
    lines = str(error).strip().splitlines()
    detail = lines[0] if lines else ""
    # Loaders explain at length how to recover; the first sentence says what went wrong.
    if len(detail) > 120 and ". " in detail:
        detail = detail[: detail.index(". ") + 1]
    if " " not in detail:
        detail = f"{type(error).__name__} {detail}".strip()
    return CliError(f"{path}: cannot read as {what} (truncated or corrupt?): {detail}")


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        if "Python objects" in str(error) or "Object arrays" in str(error):
            raise _pickled(path, "numpy.load(allow_pickle=False)") from None
        raise _corrupt(path, ".npy", error) from None
    except (OSError, EOFError) as error:
        raise _corrupt(path, ".npy", error) from None
    if not isinstance(array, np.ndarray):
        raise CliError(f"{path}: is not a .npy file (it holds an archive)")
    return array


def _read_npz(path: Path, key: str | None, wanted: str) -> tuple[np.ndarray, str]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise CliError(f"{path}: is not a .npz archive (it holds a single array)")
            key = _select(path, list(archive.files), key, wanted)
            return np.asarray(archive[key]), key
    except CliError:
        raise
    except ValueError as error:
        if "Object arrays" in str(error) or "Python objects" in str(error):
            raise _pickled(path, "numpy.load(allow_pickle=False)") from None
        raise _corrupt(path, ".npz", error) from None
    except Exception as error:
        # zipfile, zlib and the .npy header parser each raise their own kind of error.
        raise _corrupt(path, ".npz", error) from None


def _read_torch(path: Path, key: str | None, wanted: str) -> tuple[Any, str | None]:
    torch = import_optional("torch", f"reading {path}")
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            # Only the zip format of torch.save can be memory-mapped; older files are read whole.
            if "mmap" not in str(error):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise _pickled(path, "torch.load(weights_only=True)") from None
    except Exception as error:
        raise _corrupt(path, ".pt", error) from None
    if isinstance(loaded, torch.Tensor):
        if key is not None:
            raise CliError(f"{path}: holds a single tensor, not a dict; drop --key/--mask-key")
        return loaded, None
    if isinstance(loaded, dict):
        names = [name for name in loaded if isinstance(name, str)]
        key = _select(path, names, key, wanted)
        value = loaded[key]
        if not isinstance(value, torch.Tensor):
            raise CliError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        return value, key
    raise CliError(
        f"{path}: holds a {type(loaded).__name__}; expected a tensor or a dict of tensors"
    )


def _read_safetensors(path: Path, key: str | None, wanted: str) -> tuple[Any, str]:
    if not is_installed("safetensors"):
        raise CliError(
            f"{path}: reading .safetensors files needs the safetensors package, which is not "
            f"installed; pip install 'ppl[cli]'"
        )
    safetensors = import_optional("safetensors", f"reading {path}")
    try:
        with safetensors.safe_open(str(path), framework="np") as archive:
            key = _select(path, list(archive.keys()), key, wanted)
            try:
                return archive.get_tensor(key), key
            except Exception as error:
                # NumPy has no bfloat16 without ml_dtypes; torch reads it when installed.
                if not is_installed("torch"):
                    raise _corrupt(path, ".safetensors", error) from None
        with safetensors.safe_open(str(path), framework="pt") as archive:
            return archive.get_tensor(key), key
    except CliError:
        raise
    except Exception as error:
        raise _corrupt(path, ".safetensors", error) from None


def _select(path: Path, names: list[str], key: str | None, wanted: str) -> str:
    if key is not None:
        if key not in names:
            raise CliError(f"{path}: has no entry {key!r}; it holds {_list_names(names)}")
        return key
    if len(names) == 1:
        return names[0]
    if wanted in names:
        return wanted
    option = "--mask-key" if wanted == "mask" else "--key"
    if not names:
        raise CliError(f"{path}: holds no arrays")
    raise CliError(
        f"{path}: holds {len(names)} entries ({_list_names(names)}) and none is named "
        f"{wanted!r}; choose one with {option}"
    )


def _list_names(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:8])
    return shown + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _check_values(values: Any, path: Path, key: str | None, kind: str) -> None:
    where = _describe(path, key)
    name = dtype_name(values)
    if name not in FLOAT_DTYPES:
        hint = ""
        if not is_torch_tensor(values) and values.dtype.kind == "V" and values.dtype.itemsize == 2:
            hint = " (a bfloat16 array saved by NumPy loses its type; save float32, .pt or "
            hint += ".safetensors)"
        raise CliError(
            f"{where}: {kind} must be float16, bfloat16, float32 or float64; found {name}{hint}"
        )
    if values.ndim == 0:
        raise CliError(f"{where}: holds a 0-d array; {kind} must have shape [..., vocab]")
    if values.shape[-1] == 0:
        raise CliError(
            f"{where}: has shape {tuple(values.shape)}; the last axis (the vocabulary) is empty"
        )


def _check_mask(mask: Any, source: str, values: Any, values_source: str, kind: str) -> None:
    expected = tuple(int(size) for size in values.shape[:-1])
    found = tuple(int(size) for size in mask.shape)
    if found != expected:
        raise CliError(
            f"{source}: the mask has shape {found} but {values_source} needs {expected} "
            f"({kind} shape without its last axis)"
        )
    name = dtype_name(mask)
    if name != "bool" and not (name.startswith("int") or name.startswith("uint")):
        raise CliError(f"{source}: a mask must be boolean (or integer 0/1); found {name}")


def _as_bool_mask(mask: Any, source: str | None) -> Any:
    """A boolean mask block; integers must be 0 or 1 (nothing is guessed)."""
    if mask is None or dtype_name(mask) == "bool":
        return mask
    if is_torch_tensor(mask):
        is_binary = bool(((mask == 0) | (mask == 1)).all())
        converted: Any = mask != 0
    else:
        is_binary = bool(np.isin(mask, (0, 1)).all())
        converted = np.asarray(mask) != 0
    if not is_binary:
        raise CliError(f"{source}: an integer mask must hold only 0 and 1")
    return converted
