"""Published weights in, ours out: torchvision's and timm's ResNet layout.

There is no PyTorch here. The layouts are written out below from torchvision's
and timm's module structure (names and shapes), and `reference_logits` is a
forward pass of such a state dict in PyTorch's conventions (NCHW, OIHW
kernels, symmetric padding, eval-mode BN with eps 1e-5) in numpy, independent
of our model: a file loaded into our model must give its logits.
"""

import collections
import io
import os
import pickle
import re
import sys
import types
import zipfile
from unittest import mock

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
from absl.testing import absltest, parameterized
from safetensors import numpy as safetensors_numpy

from resnet_dist import models
from resnet_dist.errors import ConfigError
from resnet_dist.models import weights

STAGES = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True),
          101: ((3, 4, 23, 3), True)}


# --- The layouts, from torchvision's and timm's module structure --------------

def torchvision_layout(depth, num_classes, resnet_d=False):
  """{name: shape} of torchvision's resnetDEPTH (timm's resnetDEPTHd with resnet_d)."""
  shapes = {}

  def conv(name, out, inp, k):
    shapes[f"{name}.weight"] = (out, inp, k, k)

  def bn(name, c):
    for suffix in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.{suffix}"] = (c,)
    shapes[f"{name}.num_batches_tracked"] = ()

  if resnet_d:  # a Sequential of conv, bn, act, conv, bn, act, conv; then bn1
    conv("conv1.0", 32, 3, 3), bn("conv1.1", 32), conv("conv1.3", 32, 32, 3)
    bn("conv1.4", 32), conv("conv1.6", 64, 32, 3)
  else:
    conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  blocks, bottleneck = STAGES[depth]
  inplanes = 64
  for stage, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
    out = width * (4 if bottleneck else 1)
    for j in range(n):
      p = f"layer{stage}.{j}"
      if bottleneck:
        conv(f"{p}.conv1", width, inplanes, 1), bn(f"{p}.bn1", width)
        conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
        conv(f"{p}.conv3", out, width, 1), bn(f"{p}.bn3", out)
      else:
        conv(f"{p}.conv1", width, inplanes, 3), bn(f"{p}.bn1", width)
        conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
      if j == 0 and (stage > 1 or inplanes != out):
        first = 1 if resnet_d else 0  # timm's average pool (or Identity) is downsample.0
        conv(f"{p}.downsample.{first}", out, inplanes, 1), bn(f"{p}.downsample.{first + 1}", out)
      inplanes = out
  shapes["fc.weight"], shapes["fc.bias"] = (num_classes, inplanes), (num_classes,)
  return shapes


def cifar_layout(n, num_classes):
  """{name: shape} of the CIFAR ResNet-(6n+2) in the same naming (option-A shortcuts)."""
  shapes = {"conv1.weight": (16, 3, 3, 3)}
  bn_shapes = lambda name, c: {f"{name}.{s}": (c,) for s in
                               ("weight", "bias", "running_mean", "running_var")} | {
                                   f"{name}.num_batches_tracked": ()}
  shapes |= bn_shapes("bn1", 16)
  inplanes = 16
  for stage, width in enumerate((16, 32, 64), start=1):
    for j in range(n):
      p = f"layer{stage}.{j}"
      shapes[f"{p}.conv1.weight"] = (width, inplanes, 3, 3)
      shapes |= bn_shapes(f"{p}.bn1", width)
      shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
      shapes |= bn_shapes(f"{p}.bn2", width)
      inplanes = width
  shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 64), (num_classes,)
  return shapes


def random_state(layout, seed=0):
  """Weights of a layout that keep activations of a deep net in range."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in layout.items():
    if name.endswith("num_batches_tracked"):
      state[name] = np.array(100, np.int64)
    elif len(shape) == 4:
      fan_out = shape[0] * shape[2] * shape[3]
      state[name] = rng.normal(0, np.sqrt(2 / fan_out), shape).astype(np.float32)
    elif name == "fc.weight":
      state[name] = rng.normal(0, 0.1, shape).astype(np.float32)
    else:
      low, high = {"weight": (0.2, 0.6), "bias": (-0.1, 0.1), "running_mean": (-0.1, 0.1),
                   "running_var": (0.5, 1.5)}[name.rsplit(".", 1)[1]]
      state[name] = rng.uniform(low, high, shape).astype(np.float32)
  return state


# --- A forward pass in PyTorch's conventions ----------------------------------

def conv(x, w, stride=1, pad=0):
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
  return np.einsum("nchwij,ocij->nohw", windows[:, :, ::stride, ::stride], w, optimize=True)


def bn(x, s, name):
  scale = s[f"{name}.weight"] / np.sqrt(s[f"{name}.running_var"] + 1e-5)
  shift = s[f"{name}.bias"] - s[f"{name}.running_mean"] * scale
  return x * scale[None, :, None, None] + shift[None, :, None, None]


def relu(x):
  return np.maximum(x, 0)


def max_pool(x):  # 3x3, stride 2, padding 1
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  return np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(
      axis=(4, 5))


def avg_pool_2x2(x):
  """timm's AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False): at an odd
  size the last window holds one row or column, and averages only that."""
  n, c, h, w = x.shape
  padded = np.full((n, c, h + h % 2, w + w % 2), np.nan, x.dtype)
  padded[:, :, :h, :w] = x
  return np.nanmean(padded.reshape(n, c, (h + 1) // 2, 2, (w + 1) // 2, 2), axis=(3, 5))


def reference_logits(s, images, resnet_d=False):
  """NCHW float images -> logits of the state dict s, as torchvision/timm compute them."""
  if resnet_d:
    x = relu(bn(conv(images, s["conv1.0.weight"], 2, 1), s, "conv1.1"))
    x = relu(bn(conv(x, s["conv1.3.weight"], 1, 1), s, "conv1.4"))
    x = relu(bn(conv(x, s["conv1.6.weight"], 1, 1), s, "bn1"))
  elif s["conv1.weight"].shape[2] == 7:
    x = relu(bn(conv(images, s["conv1.weight"], 2, 3), s, "bn1"))
  else:  # CIFAR
    x = relu(bn(conv(images, s["conv1.weight"], 1, 1), s, "bn1"))
  if "conv1.weight" not in s or s["conv1.weight"].shape[2] == 7:
    x = max_pool(x)
  blocks = sorted({re.match(r"layer\d+\.\d+", k).group(0) for k in s if k.startswith("layer")},
                  key=lambda p: tuple(int(t) for t in p[5:].split(".")))
  for p in blocks:
    x = _block(x, s, p, resnet_d)
  return x.mean(axis=(2, 3)) @ s["fc.weight"].T + s["fc.bias"]


def _block(x, s, p, resnet_d):
  stride = 2 if p.endswith(".0") and not p.startswith("layer1") else 1
  if f"{p}.conv3.weight" in s:
    out = relu(bn(conv(x, s[f"{p}.conv1.weight"]), s, f"{p}.bn1"))
    out = relu(bn(conv(out, s[f"{p}.conv2.weight"], stride, 1), s, f"{p}.bn2"))
    out = bn(conv(out, s[f"{p}.conv3.weight"]), s, f"{p}.bn3")
  else:
    out = relu(bn(conv(x, s[f"{p}.conv1.weight"], stride, 1), s, f"{p}.bn1"))
    out = bn(conv(out, s[f"{p}.conv2.weight"], 1, 1), s, f"{p}.bn2")
  if f"{p}.downsample.0.weight" in s:
    identity = bn(conv(x, s[f"{p}.downsample.0.weight"], stride), s, f"{p}.downsample.1")
  elif f"{p}.downsample.1.weight" in s:
    pooled = avg_pool_2x2(x) if stride == 2 else x
    identity = bn(conv(pooled, s[f"{p}.downsample.1.weight"]), s, f"{p}.downsample.2")
  elif out.shape[1] != x.shape[1]:  # CIFAR option A: subsample, zero channels on both sides
    extra = out.shape[1] - x.shape[1]
    identity = np.pad(x[:, :, ::stride, ::stride],
                      ((0, 0), (extra // 2, extra - extra // 2), (0, 0), (0, 0)))
  else:
    identity = x
  return relu(out + identity)


def our_logits(model, images_nchw):
  return model(np.transpose(images_nchw, (0, 2, 3, 1)), training=False).numpy()


def images(size=64, seed=1):
  return np.random.default_rng(seed).normal(0, 1, (2, 3, size, size)).astype(np.float32)


# --- torch.save's format, for the .pth reader --------------------------------

# bfloat16 has no numpy type: its storages are written as the upper 16 bits of
# float32, in a structured dtype of its own so that write_pth can tell it apart.
_BFLOAT16 = np.dtype([("bfloat16", "<u2")])


def as_bfloat16(array):
  """float32 -> (bytes of bfloat16 in _BFLOAT16, the float32 values they hold)."""
  bits = (np.asarray(array, np.float32).view(np.uint32) >> 16).astype("<u2")
  return bits.view(_BFLOAT16), (bits.astype(np.uint32) << 16).view(np.float32)


def write_pth(path, state, wrapped_in=None):
  """`state` as torch.save(state) writes it: a zip of data.pkl, whose tensors
  torch._utils._rebuild_tensor_v2 rebuilds from storages ("storage" persistent
  ids naming torch.FloatStorage and the like), and the storages' raw bytes."""
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
  storage_types = {}
  for dtype, name in ((np.float32, "FloatStorage"), (np.int64, "LongStorage"),
                      (np.float16, "HalfStorage"), (np.int32, "IntStorage"),
                      (_BFLOAT16, "BFloat16Storage")):
    storage_types[np.dtype(dtype)] = type(name, (), {"__module__": "torch"})
    setattr(torch, name, storage_types[np.dtype(dtype)])

  def _rebuild_tensor_v2(*args):
    del args

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # pylint: disable=protected-access
  storages = []

  class Storage:
    def __init__(self, array):
      self.key, self.array = str(len(storages)), array
      storages.append(self)

  class Tensor:
    def __init__(self, array):
      self.array = np.ascontiguousarray(array)

    def __reduce_ex__(self, protocol):
      strides = tuple(s // self.array.itemsize for s in self.array.strides)
      return (_rebuild_tensor_v2, (Storage(self.array.ravel()), 0, self.array.shape, strides,
                                   False, collections.OrderedDict()))

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ("storage", storage_types[obj.array.dtype], obj.key, "cpu", obj.array.size)
      return None

  content = collections.OrderedDict((k, Tensor(v)) for k, v in state.items())
  if wrapped_in:  # a training checkpoint: {"epoch": 3, "state_dict": {...}}
    content = {"epoch": 3, wrapped_in: content}
  buffer = io.BytesIO()
  with mock.patch.dict(sys.modules, {"torch": torch, "torch._utils": utils}):
    Pickler(buffer, protocol=2).dump(content)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", buffer.getvalue())
    archive.writestr("archive/byteorder", "little")
    for storage in storages:
      archive.writestr(f"archive/data/{storage.key}", storage.array.astype(
          storage.array.dtype.newbyteorder("<")).tobytes())
    archive.writestr("archive/version", "3\n")


class LoadTest(parameterized.TestCase):

  def write(self, state, suffix=".safetensors"):
    path = os.path.join(self.create_tempdir().full_path, "weights" + suffix)
    if suffix == ".safetensors":
      safetensors_numpy.save_file(state, path)
    else:
      write_pth(path, state)
    return path

  @parameterized.named_parameters(
      ("torchvision_resnet18", "resnet18", "v1.5", 18, False),
      ("torchvision_resnet50", "resnet50", "v1.5", 50, False),
      ("timm_resnet50d", "resnet50", "d", 50, True))
  def test_published_layouts_give_the_reference_logits(self, name, variant, depth, resnet_d):
    state = random_state(torchvision_layout(depth, 7, resnet_d))
    model = models.get_model(name, num_classes=7, variant=variant)
    before = our_logits(model, images())
    self.assertEqual(models.load_weights(model, self.write(state)), [])
    expected = reference_logits(state, images(), resnet_d)
    np.testing.assert_allclose(our_logits(model, images()), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
    self.assertGreater(np.abs(before - expected).max(), 0.1 * np.abs(expected).max())

  def test_resnet_d_at_an_odd_size_pools_its_shortcut_as_timm(self):
    """At 48 pixels layer4's input is 3x3: its shortcut's pool makes 2x2 of
    windows of 2, 1 and 1 pixels (timm's ceil_mode, padding not counted); a
    pool that dropped the last row or averaged in zeros differs here."""
    state = random_state(torchvision_layout(50, 7, True))
    model = models.get_model("resnet50", num_classes=7, variant="d")
    models.load_weights(model, self.write(state))
    odd = images(size=48)
    expected = reference_logits(state, odd, True)
    np.testing.assert_allclose(our_logits(model, odd), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())

  def test_a_pth_file_loads_as_its_safetensors_twin_without_pytorch(self):
    state = random_state(torchvision_layout(18, 7))
    from_pth = models.get_model("resnet18", num_classes=7)
    from_safetensors = models.get_model("resnet18", num_classes=7)
    models.load_weights(from_pth, self.write(state, ".pth"))
    models.load_weights(from_safetensors, self.write(state))
    for a, b in zip(from_pth.variables, from_safetensors.variables):
      np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    self.assertNotIn("torch", sys.modules)

  def test_a_training_checkpoint_around_the_state_dict_and_half_precision(self):
    state = random_state(torchvision_layout(18, 7))
    half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in state.items()}
    path = os.path.join(self.create_tempdir().full_path, "checkpoint.pth")
    write_pth(path, half, wrapped_in="state_dict")
    model = models.get_model("resnet18", num_classes=7)
    models.load_weights(model, path)
    np.testing.assert_allclose(model.get_layer("fc").kernel.numpy(),
                               half["fc.weight"].astype(np.float32).T)

  def test_bfloat16_and_integer_storages(self):
    """A bf16 checkpoint (as timm saves some) loads as the float32 its bits
    mean, and an int32 counter beside it (num_batches_tracked) is read too."""
    state = random_state(torchvision_layout(18, 7))
    stored, values = {}, {}
    for key, value in state.items():
      if value.dtype == np.float32:
        stored[key], values[key] = as_bfloat16(value)
      else:
        stored[key] = value.astype(np.int32)
    path = os.path.join(self.create_tempdir().full_path, "bf16.pth")
    write_pth(path, stored)
    model = models.get_model("resnet18", num_classes=7)
    models.load_weights(model, path)
    np.testing.assert_array_equal(model.get_layer("fc").kernel.numpy(), values["fc.weight"].T)
    np.testing.assert_array_equal(model.get_layer("bn1").moving_variance.numpy(),
                                  values["bn1.running_var"])

  def test_what_does_not_fit_is_one_line_naming_the_first_tensor(self):
    resnet50 = models.get_model("resnet50", num_classes=10)
    for layout, message in (
        (torchvision_layout(50, 1000), r"fc.weight has shape \(1000, 2048\), resnet50 needs "
                                       r"\(10, 2048\)$"),
        (torchvision_layout(18, 10), r"has no layer1.0.conv3.weight, which resnet50 needs"),
        (torchvision_layout(101, 10), r"has layer3.10.bn1.bias, which resnet50 does not")):
      with self.assertRaisesRegex(ConfigError, message):
        models.load_weights(resnet50, self.write(random_state(layout)))
    before = resnet50.get_layer("fc").kernel.numpy()
    fresh = models.load_weights(resnet50, self.write(random_state(torchvision_layout(50, 1000))),
                                fresh_classifier=True)
    self.assertEqual(fresh, ["fc/kernel", "fc/bias"])
    np.testing.assert_array_equal(resnet50.get_layer("fc").kernel.numpy(), before)

  @parameterized.parameters(".safetensors", ".pth")
  def test_a_file_cut_short_is_one_line(self, suffix):
    """Catches a reader whose own error (safetensors' SafetensorError,
    zipfile's, pickle's) escapes as a traceback."""
    path = self.write(random_state(cifar_layout(3, 10)), suffix)
    model = models.get_model("resnet20", num_classes=10)
    size = os.path.getsize(path)
    for keep in (size // 2, 100, 5):
      with open(path, "r+b") as f:
        f.truncate(keep)
      with self.assertRaisesRegex(ConfigError, rf"^cannot read weights file .*weights{suffix}: "):
        models.load_weights(model, path)

  def test_a_damaged_byte_in_a_pth_is_one_line(self):
    """Catches zipfile's CRC error escaping as a traceback."""
    path = self.write(random_state(cifar_layout(3, 10)), ".pth")
    with open(path, "r+b") as f:
      f.seek(200)  # inside data.pkl
      byte = f.read(1)[0]
      f.seek(200)
      f.write(bytes([byte ^ 0xFF]))
    with self.assertRaisesRegex(ConfigError, r"^cannot read weights file .*: Bad CRC-32"):
      models.load_weights(models.get_model("resnet20", num_classes=10), path)

  def test_files_that_are_not_state_dicts_are_refused_without_running_them(self):
    directory = self.create_tempdir().full_path
    legacy = os.path.join(directory, "legacy.pth")
    with open(legacy, "wb") as f:
      pickle.dump({"conv1.weight": [1.0]}, f)
    hostile = os.path.join(directory, "hostile.pth")
    marker = os.path.join(directory, "ran")
    with zipfile.ZipFile(hostile, "w") as archive:
      archive.writestr("archive/data.pkl", pickle.dumps(_Runs(f"touch {marker}"), protocol=2))
    model = models.get_model("resnet20", num_classes=10)
    with self.assertRaisesRegex(ConfigError, r"legacy.pth: not a zip archive"):
      models.load_weights(model, legacy)
    with self.assertRaisesRegex(ConfigError, r"hostile.pth: it holds a posix.system, which is "
                                             r"not a tensor"):
      models.load_weights(model, hostile)
    self.assertFalse(os.path.exists(marker))
    with self.assertRaisesRegex(ConfigError, r"weights file .*none.safetensors does not exist"):
      models.load_weights(model, os.path.join(directory, "none.safetensors"))
    with self.assertRaisesRegex(ConfigError, r"weights file gs://b/w.pth: copy it to a local "
                                             r"disk first"):
      models.load_weights(model, "gs://b/w.pth")


class _Runs:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class SaveTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("resnet50", "resnet50", "v1.5", lambda: torchvision_layout(50, 5), False),
      ("resnet34d", "resnet34", "d", lambda: torchvision_layout(34, 5, True), True),
      ("cifar_resnet20", "resnet20", "v1.5", lambda: cifar_layout(3, 5), False))
  def test_saved_files_are_torchvision_state_dicts_with_our_logits(self, name, variant, layout,
                                                                   resnet_d):
    model = models.get_model(name, num_classes=5, variant=variant)
    for v in model.variables:  # moving statistics away from their 0 and 1
      v.assign(v.numpy() + np.random.default_rng(0).uniform(0.1, 0.3, v.shape))
    path = os.path.join(self.create_tempdir().full_path, "ours.safetensors")
    models.save_weights(model, path)
    saved = safetensors_numpy.load_file(path)
    self.assertEqual({k: tuple(v.shape) for k, v in saved.items()}, layout())
    self.assertTrue(all(v.dtype == (np.int64 if k.endswith("num_batches_tracked") else
                                    np.float32) for k, v in saved.items()))
    size = 32 if name == "resnet20" else 64
    expected = reference_logits(saved, images(size), resnet_d)
    np.testing.assert_allclose(our_logits(model, images(size)), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


if __name__ == "__main__":
  absltest.main()
