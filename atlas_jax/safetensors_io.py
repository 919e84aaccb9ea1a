"""A small, exact reader / writer of the safetensors format (never pickle).

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
{dtype, shape, data_offsets}, then raw little-endian bytes. Reading memory-maps the file and
returns numpy views, so a multi-gigabyte shard is never copied whole and bfloat16 tensors
stay bfloat16 (via `ml_dtypes`) with no framework in between.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

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


class SafetensorsFile(Mapping[str, np.ndarray]):
    """Read-only mapping name -> numpy view of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise SafetensorsError(f"{self.path}: file too short for a safetensors header")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8:
                    raise SafetensorsError(f"{self.path}: header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._base = 8 + n
        self._size = size
        self._mm = None
        for name, info in header.items():
            if info.get("dtype") not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            start, end = info["data_offsets"]
            expected = int(np.prod(info["shape"], dtype=np.int64)) * DTYPES[info["dtype"]].itemsize
            if end - start != expected or self._base + end > size:
                raise SafetensorsError(
                    f"{self.path}: tensor {name!r} is truncated or malformed "
                    f"(offsets {start}..{end}, {expected} bytes expected, file has {size - self._base})"
                )

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
