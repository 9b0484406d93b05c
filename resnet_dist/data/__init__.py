"""Input: sources (digits, synthetic, imagenet, tfds:NAME, folder:PATH) and the
sharded tf.data pipeline."""

from resnet_dist.data.decoding import input_threads
from resnet_dist.data.input_errors import BAD_IMAGE, BAD_LABEL, data_errors
from resnet_dist.data.pipeline import (InputSpec, check_batch_divides, check_decodable,
                                       eval_dataset_fn, eval_steps, train_dataset_fn)
from resnet_dist.data.preprocess import normalize
from resnet_dist.data.sharding import repeated_epoch
from resnet_dist.data.sources import (DATASETS_HELP, IMAGENET_MEAN, IMAGENET_STD, Source,
                                      default_data_dir, get_source, is_dataset_name)

__all__ = ["BAD_IMAGE", "BAD_LABEL", "DATASETS_HELP", "IMAGENET_MEAN", "IMAGENET_STD",
           "InputSpec", "Source",
           "check_batch_divides", "check_decodable", "data_errors", "default_data_dir",
           "eval_dataset_fn", "eval_steps", "get_source", "input_threads", "is_dataset_name",
           "normalize", "repeated_epoch",
           "train_dataset_fn"]
