"""Weights in torchvision's layout: published ResNets in, ours out for PyTorch.

Our layers carry torchvision's names (conv1, bn1, layer1.0.conv1, fc), so a
tensor maps by name alone, never by order:

  ours                              torchvision / timm
  X/kernel (conv, HWIO)             X.weight (OIHW)
  fc/kernel ([in, out])             fc.weight ([out, in])
  X/gamma, X/beta                   X.weight, X.bias
  X/moving_mean, X/moving_variance  X.running_mean, X.running_var
  (none)                            X.num_batches_tracked (ignored; written as 0)
  layerN.i/downsample_conv, _bn     layerN.i.downsample.0, .1 (ResNet-D: .1, .2,
                                    after timm's average pool at .0)
  conv1_1, bn1_1 ... conv1_3, bn1_3 conv1.0, conv1.1, conv1.3, conv1.4, conv1.6, bn1
                                    (ResNet-D's deep stem, as timm's resnet*d)

Files: .safetensors (timm's and the Hugging Face hub's format, read and
written with safetensors' numpy API) and PyTorch's .pth/.pt state dicts (read
only, without PyTorch: torch_format.py).
"""

import os
import pickle
import zipfile

import numpy as np

from resnet_dist.errors import ConfigError
from resnet_dist.models import torch_format

FORMATS = (".safetensors", ".pth", ".pt", ".bin")
_SUFFIXES = {"kernel": "weight", "gamma": "weight", "beta": "bias", "bias": "bias",
             "moving_mean": "running_mean", "moving_variance": "running_var"}
_DEEP_STEM = {"conv1_1": "conv1.0", "bn1_1": "conv1.1", "conv1_2": "conv1.3",
              "bn1_2": "conv1.4", "conv1_3": "conv1.6", "bn1_3": "bn1"}
CLASSIFIER = ("fc.weight", "fc.bias")


def is_weights_file(path):
  return str(path).endswith(FORMATS)


def torch_name(path, resnet_d=False):
  """Our variable path (layer1.0/downsample_conv/kernel) -> torchvision's name."""
  *layers, weight = path.split("/")
  layer = _DEEP_STEM.get(layers[-1], layers[-1])
  shift = 1 if resnet_d else 0
  layer = layer.replace("downsample_conv", f"downsample.{shift}")
  layer = layer.replace("downsample_bn", f"downsample.{shift + 1}")
  return ".".join([*layers[:-1], layer, _SUFFIXES[weight]])


def _to_torch(value, path):
  """Our layout -> torchvision's: OIHW conv kernels, [out, in] linear weights."""
  if path.endswith("/kernel"):
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return value


def _from_torch(value, path):
  if path.endswith("/kernel"):
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def _is_resnet_d(model):
  return any(v.path.startswith("conv1_1/") for v in model.variables)


def _named_variables(model):
  """{torchvision name: (our variable, its path)}, for every model variable."""
  resnet_d = _is_resnet_d(model)
  return {torch_name(v.path, resnet_d): (v, v.path) for v in model.variables}


def check_readable(path):
  """ConfigError unless `path` is a weights file on a local disk."""
  if "://" in path:  # safetensors and zipfile read local files only
    raise ConfigError(f"weights file {path}: copy it to a local disk first")
  if not os.path.exists(path):
    raise ConfigError(f"weights file {path} does not exist")


def read(path):
  """{name: float32 or int64 numpy array} of a .safetensors or .pth/.pt file."""
  check_readable(path)
  import safetensors  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  try:
    if path.endswith(".safetensors"):
      return safetensors_numpy.load_file(path)
    return torch_format.read_state_dict(path)
  except (torch_format.UnsupportedFile, safetensors.SafetensorError, zipfile.BadZipFile,
          pickle.UnpicklingError, EOFError, ValueError, OSError) as e:
    raise ConfigError(f"cannot read weights file {path}: {e}") from None


def load_weights(model, path, fresh_classifier=False):
  """Sets every weight of `model` from a torchvision-layout file; returns the
  paths of the variables left as they were (fc/kernel and fc/bias with
  fresh_classifier).

  Every tensor of the file is used and every weight of the model is set, or
  ConfigError names the first that is missing, unexpected or of another
  shape. fresh_classifier leaves fc as it is (another number of classes).
  """
  return assign(model, read(path), path, fresh_classifier)


def classifier_differs(model, tensors):
  """Whether the file's fc.weight is not the shape of the model's classifier."""
  ours = {name: v for name, (v, _) in _named_variables(model).items()}
  return ("fc.weight" in tensors and "fc.weight" in ours
          and tuple(tensors["fc.weight"].shape) != tuple(reversed(ours["fc.weight"].shape)))


def assign(model, tensors, path, fresh_classifier=False):
  """load_weights() of tensors already read from `path`."""
  tensors = {k: v for k, v in tensors.items() if not k.endswith(".num_batches_tracked")}
  ours = _named_variables(model)
  skip = CLASSIFIER if fresh_classifier else ()
  for name in ours:  # in the model's order, so "first" means the first layer
    if name not in tensors and name not in skip:
      raise ConfigError(f"{path} has no {name}, which {model.name} needs: the weights of "
                        f"another model?")
  for name in sorted(tensors):
    if name not in ours:
      raise ConfigError(f"{path} has {name}, which {model.name} does not: the weights of "
                        f"another model?")
  values = {}
  for name, (variable, var_path) in ours.items():
    if name in skip:
      continue
    value = _from_torch(np.asarray(tensors[name]), var_path)
    if tuple(value.shape) != tuple(variable.shape):
      expected = tuple(_to_torch(np.zeros(variable.shape), var_path).shape)
      raise ConfigError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                        f"{model.name} needs {expected}")
    values[name] = value
  for name, value in values.items():  # only once every tensor fits
    variable = ours[name][0]
    variable.assign(value.astype(variable.dtype))
  return [ours[name][1] for name in skip if name in ours]


def save_weights(model, path):
  """Writes `model` as a float32 .safetensors file in torchvision's layout and
  names, which torchvision's ResNet of the same depth loads with strict=True."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  if not str(path).endswith(".safetensors"):
    raise ConfigError(f"{path}: save_weights writes .safetensors files")
  tensors = {}
  for name, (variable, var_path) in _named_variables(model).items():
    tensors[name] = np.ascontiguousarray(
        _to_torch(np.asarray(variable.numpy(), np.float32), var_path))
    if name.endswith(".running_var"):
      tensors[name[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  safetensors_numpy.save_file(tensors, path, metadata={"format": "pt"})
