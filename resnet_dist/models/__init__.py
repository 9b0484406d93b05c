"""ResNet models by name, in torchvision's words: list_models, get_model,
count_macs, and load_weights / save_weights for torchvision's and timm's files."""

from resnet_dist.models.layers import BatchNorm, drop_path_seed
from resnet_dist.models.macs import graph_macs
from resnet_dist.models import resnet
from resnet_dist.models.resnet import VARIANTS, ResidualBlock
from resnet_dist.models.weights import load_weights, save_weights

# The model table: name -> builder(num_classes=..., **options) of a keras.Model.
# A family is a module with its own MODELS and one entry here; --model's
# choices, get_model and list_models all read this table.
MODELS = {
    **resnet.MODELS,
}


def list_models():
  """Names accepted by get_model, in the table's order."""
  return list(MODELS)


def get_model(name, num_classes=1000, **options):
  """Builds model `name` (see list_models) returning float32 logits.

  options: variant ("v1.5" default, "v1", "d"; ImageNet models), sync_bn,
  zero_init_residual, drop_path_rate (stochastic depth), image_size (None:
  any size >= 32), dtype (a Keras dtype policy name such as "mixed_bfloat16").
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(list_models())}")
  return MODELS[name](num_classes=num_classes, **options)


def count_macs(name_or_model, image_size=224, **options):
  """Multiply-adds of one forward pass of one image_size x image_size image."""
  model = name_or_model
  if isinstance(name_or_model, str):
    model = get_model(name_or_model, **options)
  return graph_macs(model, image_size)


def weight_decay_variables(model):
  """The variables L2 decay applies to: conv and dense kernels, not BN, not biases."""
  return [v for v in model.trainable_variables if v.name == "kernel"]


def plain_variable(variable):
  """The tf.Variable behind a Keras 3 variable (strategy-aware), for what
  works on tf.Variables: tf.train.Checkpoint, the optimizer's slots."""
  return getattr(variable, "value", variable) if hasattr(variable, "path") else variable


def moving_statistics(model):
  """The BN moving means and variances: the variables each replica keeps its own
  copy of (ON_READ), which Trainer.sync_moving_statistics() makes equal."""
  return [v for v in model.variables if v.synchronization == "on_read"]


__all__ = ["BatchNorm", "MODELS", "ResidualBlock", "VARIANTS", "count_macs", "drop_path_seed",
           "get_model", "list_models", "load_weights", "moving_statistics", "plain_variable",
           "save_weights", "weight_decay_variables"]
