"""Export a PyTorch recurrent model to an rrnserve weight file.

Copy this file (or import it): it needs only the Python standard library and
numpy (torch only if you pass torch tensors or use state_dict_tensors).

    from export_torch import save_rrnserve, state_dict_tensors
    config = {"task": "classify", "cell": "lstm", "hidden": 64, "layers": 1,
              "bidirectional": False, "embed_dim": 32, "pool": "last",
              "classes": ["neg", "pos"], "tokenizer": {"type": "byte"}}
    save_rrnserve("model.safetensors", state_dict_tensors(model), config)

The file is a plain safetensors file (../shared/MODELS.md): an 8-byte
little-endian header length, a JSON header padded with spaces to a multiple
of 8 bytes, then the tensors' data in sorted-name order, contiguous,
little-endian.  __metadata__ holds format, format_version, config (the
config object as a JSON string) and data_sha256 (hex SHA-256 of the data).
"""
import hashlib
import json
import struct

import numpy as np

DTYPES = ("F32", "F16", "BF16")


def _to_numpy(t):
    """A torch tensor or array-like as a float32 C-contiguous numpy array."""
    if hasattr(t, "detach"):  # torch.Tensor
        t = t.detach().cpu()
        if not t.dtype.is_floating_point:
            raise TypeError("only floating-point tensors can be exported")
        t = t.float().numpy()
    return np.ascontiguousarray(np.asarray(t, dtype=np.float32))


def _f32_to_bf16_bits(a):
    """float32 array -> uint16 bfloat16 bits, round to nearest even."""
    bits = a.astype("<f4").view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():  # keep NaNs NaN (quiet), never round them to infinity
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def encode_tensor(a, dtype):
    """The little-endian bytes of float32 array a stored as dtype."""
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    if dtype == "BF16":
        return _f32_to_bf16_bits(a).astype("<u2").tobytes()
    raise ValueError("dtype must be one of %s" % (DTYPES,))


def round_to_dtype(a, dtype):
    """The float32 values a reader of a dtype file will see for array a."""
    a = _to_numpy(a)
    if dtype == "F32":
        return a
    if dtype == "F16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        bits = _f32_to_bf16_bits(a).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(a.shape)
    raise ValueError("dtype must be one of %s" % (DTYPES,))


def save_rrnserve(path, tensors, config, dtype="F32"):
    """Write tensors (name -> torch.Tensor or numpy array) and config (the
    MODELS.md config object, a dict) to path as an rrnserve safetensors
    file with the given dtype (F32, F16 or BF16)."""
    if dtype not in DTYPES:
        raise ValueError("dtype must be one of %s" % (DTYPES,))
    names = sorted(tensors)
    header = {}
    chunks = []
    offset = 0
    for name in names:
        a = _to_numpy(tensors[name])
        raw = encode_tensor(a, dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    meta = {"format": "rrnserve", "format_version": "1",
            "config": json.dumps(config),
            "data_sha256": hashlib.sha256(data).hexdigest()}
    full = {"__metadata__": meta}
    full.update(header)
    hjson = json.dumps(full, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        f.write(data)


def state_dict_tensors(module):
    """name -> tensor for a torch module with submodules embedding
    (nn.Embedding), rnn (nn.RNN/LSTM/GRU, batch_first) and head (nn.Linear).
    PyTorch's names are already rrnserve's: embedding.weight,
    rnn.weight_ih_l0, ..., rnn.bias_hh_l0_reverse, head.weight, head.bias."""
    return {name: t.detach().cpu() for name, t in module.state_dict().items()}
