"""`digits`: the UCI handwritten digits that scikit-learn ships, as a TFDS dataset.

1,797 real 8x8 grayscale images of the digits 0-9, no download needed. The
train/test split is stratified and fixed: within each class, a permutation
seeded with 0 puts 20% of the examples (rounded) in the test split.
"""

import numpy as np
import tensorflow_datasets as tfds

TEST_FRACTION = 0.2


def stratified_split(labels, test_fraction=TEST_FRACTION, seed=0):
  """Returns (train_indices, test_indices), each sorted, fixed by the seed."""
  rng = np.random.RandomState(seed)
  train, test = [], []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    n_test = int(round(len(members) * test_fraction))
    test.extend(members[:n_test])
    train.extend(members[n_test:])
  return np.sort(train), np.sort(test)


class Digits(tfds.core.GeneratorBasedBuilder):
  """UCI ML hand-written digits (Alpaydin & Kaynak 1998), 8x8, 10 classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 80/20 split of sklearn.datasets.load_digits()."}

  def _info(self):
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data is inside scikit-learn.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    # Pixel values are 0..16 (counts of set pixels in 4x4 blocks); scale to 0..255.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    train, test = stratified_split(labels)
    return {
        "train": self._generate_examples(images, labels, train),
        "test": self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": labels[i]}
