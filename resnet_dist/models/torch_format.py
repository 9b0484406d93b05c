"""Reading PyTorch's .pth/.pt files (torch.save's zip archives) without PyTorch.

torch.save(state_dict) writes a zip archive: ARCHIVE/data.pkl, a pickle of the
dict whose tensors are rebuilt by torch._utils._rebuild_tensor_v2 from
"storages", and each storage's raw bytes in ARCHIVE/data/KEY (little-endian
unless ARCHIVE/byteorder says "big"). The pickle refers to a storage by a
persistent id ("storage", storage type, KEY, device, number of elements).

The unpickler here accepts those few globals and nothing else, so a file
cannot run code while it is read, and returns the tensors as numpy arrays.
"""

import collections
import io
import pickle
import zipfile

import numpy as np


class UnsupportedFile(ValueError):
  """The file is not a PyTorch zip archive of tensors this reader understands."""


def _bfloat16(raw):
  """bfloat16 bytes as float32: the same bits, 16 zero bits below."""
  return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)


# torch's storage classes, as a pickle names them, and their element types.
_STORAGES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """torch._utils._rebuild_tensor_v2: a view of a storage, copied out."""
  del unused  # requires_grad, backward hooks, metadata
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  """torch._utils._rebuild_parameter: an nn.Parameter is its data here."""
  del unused
  return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): name for name in _STORAGES},
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, data, read_storage):
    super().__init__(io.BytesIO(data))
    self._read_storage = read_storage
    self._storages = {}

  def find_class(self, module, name):
    if (module, name) not in _GLOBALS:
      raise UnsupportedFile(f"it holds a {module}.{name}, which is not a tensor")
    return _GLOBALS[(module, name)]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise UnsupportedFile(f"unknown persistent id {pid!r:.80}")
    storage_type, key = pid[1], str(pid[2])
    if key not in self._storages:
      self._storages[key] = self._read_storage(key, storage_type)
    return self._storages[key]


def _unwrap(obj):
  """The state dict inside a training checkpoint ({"state_dict": ...} and the like)."""
  if isinstance(obj, dict) and not any(isinstance(v, np.ndarray) for v in obj.values()):
    for key in ("state_dict", "model", "model_state_dict"):
      if isinstance(obj.get(key), dict):
        return obj[key]
  return obj


def read_state_dict(path):
  """{name: numpy array} of a file written by torch.save(model.state_dict()).

  Raises UnsupportedFile for what is not such a file: the legacy (non-zip)
  format of PyTorch before 1.6, or a pickle of anything but tensors.
  """
  if not zipfile.is_zipfile(path):
    raise UnsupportedFile("not a zip archive (PyTorch 1.6 or later writes one; re-save the "
                          "file with torch.save, or convert it to .safetensors)")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
    if not pickles:
      raise UnsupportedFile("the archive has no data.pkl")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    big_endian = (f"{prefix}byteorder" in names
                  and archive.read(f"{prefix}byteorder").strip() == b"big")

    def read_storage(key, storage_type):
      if storage_type not in _STORAGES:
        raise UnsupportedFile(f"storage type {storage_type!r} is not supported")
      raw = archive.read(f"{prefix}data/{key}")
      dtype = _STORAGES[storage_type]
      if dtype == "bfloat16":
        return _bfloat16(raw if not big_endian else np.frombuffer(raw, ">u2").astype("<u2"))
      array = np.frombuffer(raw, dtype)
      return array.byteswap() if big_endian and array.itemsize > 1 else array

    state = _unwrap(_Unpickler(archive.read(pickles[0]), read_storage).load())
  if not isinstance(state, dict):
    raise UnsupportedFile(f"it holds a {type(state).__name__}, not a state dict")
  return {str(k): v for k, v in state.items() if isinstance(v, np.ndarray)}
