"""Multiply-adds of one forward pass, read off the traced TensorFlow graph."""

import numpy as np
import tensorflow as tf


def graph_macs(model, image_size):
  """Sums the MACs of every Conv2D, DepthwiseConv2dNative and MatMul op.

  Works for any Keras model (ours, or keras.applications for comparisons):
  it traces one image of image_size x image_size x 3 and reads static shapes.
  """
  fn = tf.function(lambda x: model(x, training=False))
  graph = fn.get_concrete_function(
      tf.TensorSpec([1, image_size, image_size, 3], tf.float32)).graph
  total = 0
  for op in graph.get_operations():
    if op.type == "Conv2D":
      kh, kw, cin, _ = op.inputs[1].shape.as_list()
      total += int(np.prod(op.outputs[0].shape.as_list()[1:])) * kh * kw * cin
    elif op.type == "DepthwiseConv2dNative":
      kh, kw, _, _ = op.inputs[1].shape.as_list()
      total += int(np.prod(op.outputs[0].shape.as_list()[1:])) * kh * kw
    elif op.type in ("MatMul", "BatchMatMulV2"):
      a, b = op.inputs[0].shape.as_list(), op.inputs[1].shape.as_list()
      transpose_a = op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x")
      k = a[0] if transpose_a else a[-1]
      total += int(np.prod(op.outputs[0].shape.as_list()[1:])) * k
  return total
