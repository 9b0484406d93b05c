"""The ResNet family: ImageNet ResNet-18..152 (v1, v1.5, D) and CIFAR ResNet-20..110.

One table drives every depth. Layer names follow torchvision (conv1, bn1,
layer1..layer4, downsample, fc) so weights and papers map onto the code.

Every layer is created in a block's __init__; the functional model builds them
all at construction, so no variable appears after the first call. Each
residual branch ends in BN without ReLU; ReLU follows the add (He et al. 2016).
"""

import dataclasses
import functools

import keras
import tensorflow as tf

from resnet_dist.models.layers import BatchNorm, conv, drop_path

VARIANTS = ("v1.5", "v1", "d")


@dataclasses.dataclass(frozen=True)
class Spec:
  block: str            # "basic" or "bottleneck"
  stage_sizes: tuple    # blocks per stage
  widths: tuple         # 3x3 conv channels per stage
  cifar: bool = False   # 3x3 stem, no max-pool, option-A shortcuts


_IMAGENET_WIDTHS = (64, 128, 256, 512)
_CIFAR_WIDTHS = (16, 32, 64)

# Shallowest first within each family: the order list_models() gives.
SPECS = {
    "resnet18": Spec("basic", (2, 2, 2, 2), _IMAGENET_WIDTHS),
    "resnet34": Spec("basic", (3, 4, 6, 3), _IMAGENET_WIDTHS),
    "resnet50": Spec("bottleneck", (3, 4, 6, 3), _IMAGENET_WIDTHS),
    "resnet101": Spec("bottleneck", (3, 4, 23, 3), _IMAGENET_WIDTHS),
    "resnet152": Spec("bottleneck", (3, 8, 36, 3), _IMAGENET_WIDTHS),
    # He et al. 2015, section 4.2: depth 6n + 2, n blocks in each of 3 stages.
    # ResNet-8 (n = 1) is the tests' model: the family's every layer kind, fast to trace.
    **{f"resnet{6 * n + 2}": Spec("basic", (n, n, n), _CIFAR_WIDTHS, cifar=True)
       for n in (1, 3, 5, 7, 9, 18)},
}

EXPANSION = {"basic": 1, "bottleneck": 4}


def _apply(layers, x, training):
  for layer in layers:
    x = layer(x, training=training) if isinstance(layer, BatchNorm) else layer(x)
  return x


@keras.saving.register_keras_serializable(package="resnet_dist")
class ResidualBlock(keras.layers.Layer):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block.

  shortcut: "identity"; "conv" (1x1 conv with the stride + BN); "avgpool_conv"
  (ResNet-D: 2x2 average pool, then 1x1 conv + BN); "zero_pad" (CIFAR option A:
  subsample and pad channels with zeros, no parameters).
  stride_on: "3x3" (v1.5 and D) or "1x1" (v1: the stride on the first 1x1 conv).
  drop_path_rate: in training, the probability of dropping the residual branch
  of each example (stochastic depth); index: the block's place in the network.
  """

  def __init__(self, block, width, stride=1, shortcut="identity", stride_on="3x3",
               sync_bn=False, zero_init_residual=False, drop_path_rate=0.0, index=0,
               **kwargs):
    super().__init__(**kwargs)
    self.config = dict(block=block, width=width, stride=stride, shortcut=shortcut,
                       stride_on=stride_on, sync_bn=sync_bn,
                       zero_init_residual=zero_init_residual, drop_path_rate=drop_path_rate,
                       index=index)
    self.out_channels = width * EXPANSION[block]
    dtype = kwargs.get("dtype")

    def bn(name, last=False):
      return BatchNorm(synchronized=sync_bn, zero_init=last and zero_init_residual,
                       name=name, dtype=dtype)

    if block == "basic":
      self.branch = [*conv(width, 3, stride, "conv1", dtype=dtype), bn("bn1"),
                     keras.layers.ReLU(dtype=dtype),
                     *conv(width, 3, 1, "conv2", dtype=dtype), bn("bn2", last=True)]
    else:
      s1, s3 = (stride, 1) if stride_on == "1x1" else (1, stride)
      self.branch = [*conv(width, 1, s1, "conv1", dtype=dtype), bn("bn1"),
                     keras.layers.ReLU(dtype=dtype),
                     *conv(width, 3, s3, "conv2", dtype=dtype), bn("bn2"),
                     keras.layers.ReLU(dtype=dtype),
                     *conv(self.out_channels, 1, 1, "conv3", dtype=dtype), bn("bn3", last=True)]
    if shortcut == "conv":
      self.downsample = [*conv(self.out_channels, 1, stride, "downsample_conv", dtype=dtype),
                         bn("downsample_bn")]
    elif shortcut == "avgpool_conv":
      pool = ([keras.layers.AveragePooling2D(2, stride, padding="same", dtype=dtype)]
              if stride > 1 else [])
      self.downsample = [*pool, *conv(self.out_channels, 1, 1, "downsample_conv", dtype=dtype),
                         bn("downsample_bn")]
    else:
      self.downsample = []
    self.relu = keras.layers.ReLU(dtype=dtype)

  def build(self, input_shape):
    # Builds every sublayer here, so that loading a saved model restores them all.
    for layers in (self.branch, self.downsample):
      shape = tuple(input_shape)
      for layer in layers:
        layer.build(shape)
        shape = layer.compute_output_shape(shape)
    self.relu.build(self.compute_output_shape(input_shape))

  def call(self, inputs, training=False):
    residual = _apply(self.branch, inputs, training)
    if training and self.config["drop_path_rate"] > 0:
      residual = drop_path(residual, self.config["drop_path_rate"], self.config["index"])
    if self.config["shortcut"] == "zero_pad":
      identity = inputs[:, ::self.config["stride"], ::self.config["stride"], :]
      extra = self.out_channels - inputs.shape[-1]
      identity = tf.pad(identity, [[0, 0], [0, 0], [0, 0], [extra // 2, extra - extra // 2]])
    else:
      identity = _apply(self.downsample, inputs, training)
    return self.relu(residual + identity)

  def compute_output_shape(self, input_shape):
    n, h, w, _ = input_shape
    s = self.config["stride"]
    shrink = lambda d: None if d is None else (d + s - 1) // s
    return (n, shrink(h), shrink(w), self.out_channels)

  def get_config(self):
    return {**super().get_config(), **self.config}


def build_resnet(name, num_classes=1000, variant="v1.5", sync_bn=False,
                 zero_init_residual=False, drop_path_rate=0.0, image_size=None, dtype=None):
  """Returns the keras.Model `name` with logits in float32.

  image_size fixes the input's spatial size (None accepts any size >= 32);
  dtype is a Keras dtype policy name such as "mixed_bfloat16". drop_path_rate:
  stochastic depth, rising linearly from 0 at the first block to this at the
  last, as timm's ResNets.
  """
  spec = SPECS[name]
  if variant not in VARIANTS:
    raise ValueError(f"unknown ResNet variant {variant!r}; choose from {', '.join(VARIANTS)}")
  bn_kwargs = dict(synchronized=sync_bn, dtype=dtype)
  inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
  x = inputs
  if spec.cifar:
    stem = [*conv(16, 3, 1, "conv1", dtype=dtype), BatchNorm(name="bn1", **bn_kwargs),
            keras.layers.ReLU(name="relu", dtype=dtype)]
  elif variant == "d":
    # Bag of Tricks (He et al. 2019): three 3x3 convs replace the 7x7 stem conv.
    stem = []
    for i, (filters, stride) in enumerate([(32, 2), (32, 1), (64, 1)], start=1):
      stem += [*conv(filters, 3, stride, f"conv1_{i}", dtype=dtype),
               BatchNorm(name=f"bn1_{i}", **bn_kwargs),
               keras.layers.ReLU(name=f"relu1_{i}", dtype=dtype)]
  else:
    stem = [*conv(64, 7, 2, "conv1", dtype=dtype), BatchNorm(name="bn1", **bn_kwargs),
            keras.layers.ReLU(name="relu", dtype=dtype)]
  if not spec.cifar:
    # Zero padding equals torchvision's -inf padding here: the inputs are >= 0 after ReLU.
    stem += [keras.layers.ZeroPadding2D(1, name="maxpool_pad", dtype=dtype),
             keras.layers.MaxPooling2D(3, 2, name="maxpool", dtype=dtype)]
  x = _apply(stem, x, training=None)

  channels = 16 if spec.cifar else 64
  num_blocks, index = sum(spec.stage_sizes), 0
  for stage, (blocks, width) in enumerate(zip(spec.stage_sizes, spec.widths), start=1):
    for position in range(blocks):
      stride = 2 if stage > 1 and position == 0 else 1
      out_channels = width * EXPANSION[spec.block]
      if stride == 1 and channels == out_channels:
        shortcut = "identity"
      elif spec.cifar:
        shortcut = "zero_pad"
      else:
        shortcut = "avgpool_conv" if variant == "d" else "conv"
      x = ResidualBlock(
          spec.block, width, stride, shortcut,
          stride_on="1x1" if variant == "v1" else "3x3", sync_bn=sync_bn,
          zero_init_residual=zero_init_residual,
          drop_path_rate=drop_path_rate * index / max(num_blocks - 1, 1), index=index,
          name=f"layer{stage}.{position}", dtype=dtype)(x)
      channels, index = out_channels, index + 1
  x = keras.layers.GlobalAveragePooling2D(name="avgpool", dtype=dtype)(x)
  # The classifier runs in float32: logits feed a softmax cross-entropy.
  logits = keras.layers.Dense(
      num_classes, name="fc", dtype="float32",
      kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))(x)
  suffix = "" if spec.cifar or variant == "v1.5" else f"_{variant.replace('.', '')}"
  return keras.Model(inputs, logits, name=name + suffix)


# This family's entries of the model table (models.MODELS): name -> builder.
MODELS = {name: functools.partial(build_resnet, name) for name in SPECS}
