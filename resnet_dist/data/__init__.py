"""Input: sources (digits, synthetic, tfds:NAME) and the sharded tf.data pipeline."""

from resnet_dist.data.pipeline import (InputConfig, check_batch_divides, eval_dataset_fn,
                                       eval_steps, train_dataset_fn)
from resnet_dist.data.sources import Source, default_data_dir, get_source

__all__ = ["InputConfig", "Source", "check_batch_divides", "default_data_dir",
           "eval_dataset_fn", "eval_steps", "get_source", "train_dataset_fn"]
