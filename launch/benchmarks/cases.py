"""What a training case is, how long it is measured, and the multiply-adds
its figures are counted by.

A case is a plain dict: it crosses to the process that times it as JSON, and
its keys, in this order, are the first columns of its row. kind says what
trains: resnet_dist (our train loop), resnet_dist_step (our model in the
plain step every framework is compared by), keras_peer (keras.applications'
ResNet50 in that step) or a launch.peers name; then model, batch, dtype,
strategy, steps_per_loop, xla, image_size, and what a mode adds (input,
data_dir, data_service, profile_dir).

This module is imported by the process that parses the flags: TensorFlow
loads only where a function below needs the library.
"""

import dataclasses
import functools

# keras.applications' ResNet50 (v1) at 224x224 (models.count_macs of
# keras.applications.ResNet50(weights=None) is 3,857,973,248). A number, not
# a count: that model is no entry of our model table, and the process that
# compares with it (mac_scaled) never builds it. Other sizes scale it by the
# image's area (peer_macs).
PEER_MACS = 3.858e9


@dataclasses.dataclass(frozen=True)
class Budget:
  """How long each case is measured: at least `seconds` over all its
  `rounds`, and at least `min_steps` steps in each round."""
  seconds: float
  rounds: int
  min_steps: int = 1

  def one_round(self):
    """The budget of one of the rounds, for a process that runs only it."""
    return dataclasses.replace(self, seconds=self.seconds / self.rounds, rounds=1)


def case(model, batch, dtype="fp32", strategy="one_device", steps_per_loop=1, xla=False,
         kind="resnet_dist", image_size=224, **extra):
  """A case; a CIFAR model's images are 32x32, whatever image_size says."""
  return {"kind": kind, "model": model, "batch": int(batch), "dtype": dtype,
          "strategy": strategy, "steps_per_loop": int(steps_per_loop), "xla": xla,
          "image_size": 32 if model in cifar_models() else image_size, **extra}


@functools.lru_cache(maxsize=None)
def cifar_models():
  """The model table's CIFAR ResNets, which take 32x32 images: the family's
  own specs say which."""
  from resnet_dist import models  # pylint: disable=g-import-not-at-top
  specs = models.resnet.SPECS
  return frozenset(name for name in models.list_models() if name in specs and specs[name].cifar)


@functools.lru_cache(maxsize=None)
def resnet50_macs(image_size=224):
  """Our ResNet-50's (v1.5) multiply-adds per image, as the library counts
  them; the outside peers' too, which train v1.5 as we do."""
  from resnet_dist import models  # pylint: disable=g-import-not-at-top
  return models.count_macs("resnet50", image_size)


def peer_macs(image_size):
  """keras.applications' ResNet50's multiply-adds per image (PEER_MACS)."""
  return PEER_MACS * (image_size / 224)**2


def mac_scaled(peer_row):
  """The keras peer's images/s had it done our ResNet-50's multiply-adds per image."""
  return peer_row["images_per_second"] * PEER_MACS / resnet50_macs()
