"""Read .safetensors files into numpy without torch, bfloat16 included.

`safetensors.numpy` 0.8 raises "data type 'bfloat16' not understood" (numpy has no bf16), and
every released Apollo-MoE checkpoint is bf16. The format is simple: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw little-endian bytes.
"""

import json
import struct

import numpy as np

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?"}


def read_safetensors(path) -> dict:
  """{name: np.ndarray} of one .safetensors file; BF16 becomes float32 (exactly: bf16 = top 16 bits)."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    lo, hi = info["data_offsets"]
    raw, shape, dt = data[lo:hi], tuple(info["shape"]), info["dtype"]
    if dt == "BF16":
      arr = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif dt in _DTYPES:
      arr = np.array(raw.view(_DTYPES[dt]))
    else:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
    out[name] = arr.reshape(shape)
  return out
