"""The Model Garden peer: official.vision's ResNet-50 (v1.5, as ours) in its
ClassificationModel, under tf-keras, trained by a plain tf.function step with
SGD and momentum; bf16 by tf-keras's mixed_bfloat16 policy.

Run by launch.benchmark in the peer's own virtual environment:
  python modelgarden_step.py CASE_JSON SECONDS MIN_STEPS
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_keras  # pylint: disable=g-import-not-at-top
from official.vision.modeling import classification_model  # pylint: disable=g-import-not-at-top
from official.vision.modeling.backbones import resnet  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tf_step  # pylint: disable=g-import-not-at-top
import timing  # pylint: disable=g-import-not-at-top


def build(case):
  """run_loop(n) for a case of dtype fp32 or bf16."""
  if case["dtype"] == "bf16":
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
  size = case["image_size"]
  specs = tf_keras.layers.InputSpec(shape=[None, size, size, 3])
  model = classification_model.ClassificationModel(
      backbone=resnet.ResNet(model_id=50, input_specs=specs), num_classes=1000,
      input_specs=specs)
  optimizer = tf_keras.optimizers.SGD(0.01, momentum=0.9)
  return tf_step.plain_loop(model, optimizer, case["batch"], size)


if __name__ == "__main__":
  timing.peer_main(build, tf_step.trace)
