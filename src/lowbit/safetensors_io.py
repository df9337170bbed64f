"""A small, careful safetensors reader and writer.

Why our own: the package loader must (1) check every size, offset, dtype and shape of a file it
did not write before touching the data (DESIGN.md section 5: hostile or truncated files get a
message, never a crash), (2) memory-map the file so that load time and resident memory follow
what is used, not the file size, and (3) write large files in a stream (``safetensors.torch.
save_file`` builds the whole file in memory first). Files written here are ordinary safetensors
files: ``safetensors.safe_open`` reads them.

File layout (https://github.com/huggingface/safetensors): 8 bytes little-endian u64 ``N``, then
``N`` bytes of a JSON object ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}``, then the data section; offsets are relative to its start.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

__all__ = ["PackageError", "read_header", "open_mmap", "write", "DTYPES", "DTYPE_NAMES"]

# safetensors dtype name -> torch dtype (an allow-list: anything else is refused)
DTYPES: dict[str, torch.dtype] = {
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the official library's own limit
_CHUNK = 16 * 1024 * 1024  # bytes written per call when streaming a tensor out


class PackageError(ValueError):
    """A package or weights file is malformed, truncated, or does not match its manifest."""


def _err(path: Path, what: str) -> PackageError:
    return PackageError(f"{path}: {what}")


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """Read and validate a safetensors header without reading any tensor data.

    Returns ``(header, data_offset)``: the JSON header (tensor name -> ``{"dtype", "shape",
    "data_offsets"}``, plus ``"__metadata__"`` when present) and the byte offset of the data
    section in the file. Raises `PackageError` naming the file, the tensor and the problem.

    Example:
        >>> import torch, tempfile, os
        >>> from lowbit import safetensors_io as st
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> _ = st.write(p, {"a": torch.zeros(2, 3)})
        >>> header, start = st.read_header(p)
        >>> header["a"]["dtype"], header["a"]["shape"], start % 8
        ('F32', [2, 3], 0)
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 8:
                raise _err(path, f"file is {size} bytes, too short for a safetensors header (truncated?)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES:
                raise _err(path, f"header length {n} is larger than the {MAX_HEADER_BYTES}-byte limit (corrupt file?)")
            if n > size - 8:
                raise _err(path, f"header length {n} runs past the end of the {size}-byte file (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise _err(path, f"cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(path, f"header is not valid UTF-8 JSON ({e})") from None
    except _Duplicate as e:
        raise _err(path, f"header names {e.args[0]!r} twice") from None
    except RecursionError:
        raise _err(path, "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise _err(path, f"header must be a JSON object, got {type(header).__name__}")

    data_offset = 8 + n
    data_len = size - data_offset
    meta = header.get("__metadata__")
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise _err(path, "__metadata__ must map strings to strings")

    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        if not isinstance(info, dict):
            raise _err(path, f"{where}: entry must be an object, got {type(info).__name__}")
        extra = set(info) - {"dtype", "shape", "data_offsets"}
        missing = {"dtype", "shape", "data_offsets"} - set(info)
        if missing:
            raise _err(path, f"{where}: missing {sorted(missing)}")
        if extra:
            raise _err(path, f"{where}: unexpected key(s) {sorted(extra)}")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise _err(path, f"{where}: dtype {dtype!r} is not supported (allowed: {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise _err(path, f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)):
            raise _err(path, f"{where}: data_offsets must be [begin, end] non-negative ints, got {offs!r}")
        begin, end = offs
        if begin > end:
            raise _err(path, f"{where}: data_offsets begin {begin} > end {end}")
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        if end - begin != nbytes:
            raise _err(path, f"{where}: {dtype} {shape} needs {nbytes} bytes but data_offsets span {end - begin}")
        if end > data_len:
            raise _err(
                path, f"{where}: data_offsets [{begin}, {end}] run past the end of the data section "
                f"({data_len} bytes; file truncated?)"
            )
        spans.append((begin, end, name))

    # Overlapping tensors would alias each other's bytes: refuse. Empty tensors overlap nothing.
    spans.sort()
    prev_end, prev_name = 0, None
    for begin, end, name in spans:
        if begin == end:
            continue
        if begin < prev_end:
            raise _err(path, f"tensor {name!r} overlaps tensor {prev_name!r} in the data section")
        prev_end, prev_name = end, name
    return header, data_offset


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads would silently keep the last of two entries with one name: refuse instead
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def open_mmap(path: str | os.PathLike, header: tuple[dict[str, Any], int] | None = None) -> dict[str, torch.Tensor]:
    """Validate, then memory-map a safetensors file; returns name -> tensor views of the mapping.

    The mapping is private copy-on-write (``torch.from_file(..., shared=False)``): nothing is
    read until a tensor's pages are touched, and writing to a tensor never changes the file.
    Every view shares one storage. A tensor whose offset is not a multiple of its item size
    (possible in files from other writers) is copied instead.

    Args:
        path: the file.
        header: ``read_header(path)``'s result, if the caller already has it.

    Example:
        >>> import torch, tempfile, os
        >>> from lowbit import safetensors_io as st
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> _ = st.write(p, {"a": torch.arange(6.).reshape(2, 3), "b": torch.ones(4, dtype=torch.uint8)})
        >>> t = st.open_mmap(p)
        >>> t["a"][1].tolist(), t["a"].untyped_storage().data_ptr() == t["b"].untyped_storage().data_ptr()
        ([3.0, 4.0, 5.0], True)
    """
    path = Path(path)
    hdr, data_offset = header if header is not None else read_header(path)
    size = path.stat().st_size
    if size < data_offset + max((v["data_offsets"][1] for k, v in hdr.items() if k != "__metadata__"), default=0):
        raise _err(path, "file shrank after its header was read")
    try:
        buf = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    except RuntimeError as e:
        raise _err(path, f"cannot memory-map: {e}") from e
    out: dict[str, torch.Tensor] = {}
    for name, info in hdr.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        raw = buf[data_offset + begin: data_offset + end]
        if (data_offset + begin) % ITEMSIZE[info["dtype"]]:
            raw = raw.clone()  # a misaligned view cannot be reinterpreted in place: copy this one
        out[name] = raw.view(dtype).reshape(info["shape"])
    return out


def write(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    *,
    fsync: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> str:
    """Write `tensors` as a safetensors file, streaming one chunk at a time; returns its sha256.

    Tensors may live on any device and need not be contiguous (each is copied to CPU as it is
    written). Nothing is deduplicated: two entries sharing storage are written twice. Tensors are
    laid out largest item size first, so every offset is a multiple of its item size and the data
    section starts on an 8-byte boundary (memory-mapped views need no copies).

    Args:
        path: output file (overwritten).
        tensors: name -> tensor; dtypes from `DTYPES` only.
        metadata: optional str -> str map stored as ``__metadata__``.
        fsync: flush the file to disk before returning.
        on_chunk: test hook, called with the running byte count after each chunk is written.

    Example:
        >>> import torch, tempfile, os
        >>> from safetensors import safe_open
        >>> from lowbit import safetensors_io as st
        >>> p = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> _ = st.write(p, {"w": torch.eye(2, dtype=torch.bfloat16)}, {"format": "pt"})
        >>> with safe_open(p, "pt") as f:
        ...     f.get_tensor("w").tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    path = Path(path)
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("safetensors metadata must map str to str")
    for name, t in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored (allowed: {list(DTYPE_NAMES)})")
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device (it has no data to write)")

    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    pos = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # spaces are the spec's padding; data starts 8-aligned

    h = hashlib.sha256()
    written = 0
    with open(path, "wb") as f:
        written += _put(f, h, struct.pack("<Q", len(raw)) + raw)
        for name in order:
            flat = tensors[name].detach().reshape(-1)
            step = max(1, _CHUNK // max(flat.element_size(), 1))
            for i in range(0, flat.numel(), step):
                piece = flat[i: i + step].to("cpu").contiguous().view(torch.uint8).numpy()
                written += _put(f, h, memoryview(piece))
                if on_chunk is not None:
                    on_chunk(written)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    return h.hexdigest()


def _put(f: BinaryIO, h: "hashlib._Hash", data: bytes | memoryview) -> int:
    f.write(data)
    h.update(data)
    return len(data)


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
