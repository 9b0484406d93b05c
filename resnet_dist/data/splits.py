"""The two kinds of split a source serves (see sources.py)."""

import dataclasses
from typing import Callable


@dataclasses.dataclass
class IndexedSplit:
  """fetch(int64 index) -> (image, int64 label, string name for error messages).

  image: uint8 [H, W, C], or encoded bytes (JPEG, PNG) when encoded.
  """
  num_examples: int
  fetch: Callable
  encoded: bool = False


@dataclasses.dataclass
class RecordSplit:
  """TFRecord files; parse(serialized record) -> (encoded image, int64 label).

  parse_group(records [n]) -> (images [n], labels [n], missing [n]): the
  same for a group of records at once, with missing the name of a feature a
  record lacks ("" when it has them all). None: parse, vectorized.
  """
  files: list
  counts: list
  parse: Callable
  parse_group: Callable = None
  encoded = True

  @property
  def num_examples(self):
    return sum(self.counts)
