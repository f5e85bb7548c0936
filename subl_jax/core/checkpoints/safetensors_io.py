"""A small memory-mapped safetensors reader: tensors are read one at a time, never the whole file.

Implemented on the format itself (8-byte little-endian header size, JSON header, raw data) so bf16 reads through
`ml_dtypes` without torch, and a truncated file is reported with the tensor that runs past its end.
"""

from __future__ import annotations

import json
import pathlib
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsDir:
  """All tensors of the `*.safetensors` files in an HF directory, by name."""

  def __init__(self, directory: str | pathlib.Path):
    self.dir = pathlib.Path(directory)
    files = sorted(self.dir.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"{self.dir}: no *.safetensors files (expected an HF checkpoint directory)")
    self._where: dict[str, tuple[pathlib.Path, dict, int]] = {}
    for f in files:
      header, data_start = _read_header(f)
      size = f.stat().st_size
      for name, info in header.items():
        if name == "__metadata__":
          continue
        if info.get("dtype") not in _DTYPES:
          raise ValueError(f"{f}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        end = data_start + info["data_offsets"][1]
        if end > size:
          raise ValueError(f"{f}: truncated — tensor {name!r} ends at byte {end} but the file has {size} bytes")
        self._where[name] = (f, info, data_start)

  def names(self) -> list[str]:
    return list(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def __getitem__(self, name: str) -> np.ndarray:
    f, info, data_start = self._where[name]  # KeyError for a missing tensor
    begin, end = info["data_offsets"]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    shape = tuple(info["shape"])
    if (end - begin) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise ValueError(f"{f}: tensor {name!r} has {end - begin} bytes, expected {shape} x {dtype}")
    return np.memmap(f, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
  with open(path, "rb") as fh:
    raw = fh.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
    (n,) = struct.unpack("<Q", raw)
    blob = fh.read(n)
  if len(blob) < n:
    raise ValueError(f"{path}: truncated safetensors header ({len(blob)} of {n} bytes)")
  try:
    return json.loads(blob), 8 + n
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
