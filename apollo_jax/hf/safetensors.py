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


_WRITE_DTYPES = {"float32": ("F32", "<f4"), "bfloat16": ("BF16", None), "float16": ("F16", "<f2")}


def to_bytes(arr, dtype: str) -> bytes:
  """Little-endian bytes of `arr` in `dtype` (bfloat16: round to nearest even, via ml_dtypes)."""
  if dtype == "bfloat16":
    import ml_dtypes
    return np.ascontiguousarray(np.asarray(arr, np.float32).astype(ml_dtypes.bfloat16)).view("<u2").tobytes()
  return np.ascontiguousarray(np.asarray(arr).astype(_WRITE_DTYPES[dtype][1])).tobytes()


def write_safetensors(path, tensors: dict, dtype: str = "float32", metadata=None):
  """{name: array} -> one .safetensors file with every tensor in `dtype` (zero-size ones too)."""
  if dtype not in _WRITE_DTYPES:
    raise ValueError(f"dtype={dtype!r}; choose one of {tuple(_WRITE_DTYPES)}")
  header, blobs, offset = {}, [], 0
  for name, arr in tensors.items():
    raw = to_bytes(arr, dtype)
    header[name] = {"dtype": _WRITE_DTYPES[dtype][0], "shape": list(np.shape(arr)),
                    "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)           # data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for raw in blobs:
      f.write(raw)
