"""A small, exact reader / writer of the safetensors format (never pickle).

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets}, then raw little-endian bytes. The `safetensors` library validates
every header read here; reading then memory-maps the file and returns numpy views, so a
multi-gigabyte shard is never copied whole and bfloat16 tensors stay bfloat16 (via `ml_dtypes`),
which the library's numpy reader cannot return.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np
import safetensors

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read; the message names the file."""


# The safetensors library's own bound on a header, so a corrupt length cannot make us read gigabytes.
MAX_HEADER_BYTES = 100_000_000
_ENTRY = "an object {dtype, shape: [n, ...], data_offsets: [begin, end]}"


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Read-only mapping name -> numpy view of one .safetensors file.

    Nothing is read from a malformed header: each entry's types are checked here, so the error names
    the tensor and the key, then the `safetensors` library checks the layout (data offsets that tile
    the data exactly: none overlapping, leaving gaps, or past the end of a truncated file). The
    views come from a memory map, so a sharded load copies out only each device's slice.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        header, self._base = _read_header(self.path)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SafetensorsError(f"{self.path}: header field __metadata__ is not an object of strings")
        for name, info in header.items():
            _check_entry(self.path, name, info)
        try:
            with safetensors.safe_open(self.path, framework="numpy"):
                pass
        except safetensors.SafetensorError as e:
            raise SafetensorsError(
                f"{self.path}: tensor data do not match the header (truncated, or data_offsets that overlap, "
                f"leave gaps or run past the end): {e}"
            ) from e
        self.metadata = metadata
        self._header = header
        self._mm = None

    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        h = self._header[name]
        return tuple(h["shape"]), DTYPES[h["dtype"]]

    def __getitem__(self, name: str) -> np.ndarray:
        h = self._header[name]
        start, end = h["data_offsets"]
        buf = self._map()[self._base + start : self._base + end]
        return buf.view(DTYPES[h["dtype"]]).reshape(h["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self) -> int:
        return len(self._header)


def _read_header(path: str) -> tuple[dict, int]:
    """(the JSON header, the byte offset where tensor data begin) of the file at `path`."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            size = os.fstat(f.fileno()).st_size
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
            if n is None or n > min(size - 8, MAX_HEADER_BYTES):
                raise SafetensorsError(f"{path}: truncated, or not a safetensors file (header length {n}, file size {size})")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: not a readable safetensors header ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, expected an object name -> {_ENTRY}")
    return header, 8 + n


def _check_entry(path: str, name: str, info) -> None:
    """Raise SafetensorsError naming the tensor and the key when a header entry is not `_ENTRY`."""
    if not isinstance(info, dict):
        raise SafetensorsError(f"{path}: header entry {name!r} is a {type(info).__name__}, expected {_ENTRY}")
    for key, length in (("shape", None), ("data_offsets", 2)):
        value = info.get(key)
        if not (isinstance(value, list) and all(type(x) is int and x >= 0 for x in value) and length in (None, len(value))):
            raise SafetensorsError(
                f"{path}: tensor {name!r} has {key}={value!r}, expected a list of "
                f"{'' if length is None else f'{length} '}non-negative integers"
            )
    if info.get("dtype") not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")


def save_file(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Writes tensors (numpy, any DTYPES dtype) to `path` atomically (temp file + rename)."""
    path = os.fspath(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset, arrays = 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {a.dtype} with no safetensors code")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": NAMES[a.dtype.newbyteorder("=")], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)
