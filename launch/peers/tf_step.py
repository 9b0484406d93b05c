"""The plain training step every TensorFlow case is compared by (ours, the
keras.applications peer, Model Garden's), and its trace. TensorFlow only:
Model Garden's environment runs it too, with tf-keras for Keras."""

import tensorflow as tf


def plain_loop(model, optimizer, batch, image_size, num_classes=1000):
  """run_loop(n): n steps of forward, softmax cross-entropy, backward and
  update on one batch of random float images, made once; the optimizer
  built already."""
  images = tf.random.uniform([batch, image_size, image_size, 3])
  labels = tf.random.uniform([batch], maxval=num_classes, dtype=tf.int64)

  @tf.function
  def loop(n):
    for _ in tf.range(n):
      with tf.GradientTape() as tape:
        logits = tf.cast(model(images, training=True), tf.float32)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
      grads = tape.gradient(loss, model.trainable_variables)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))

  return lambda n: loop(tf.constant(n))


def trace(run_loop, directory, steps=2):
  """A tf.profiler trace of `steps` steps in directory."""
  tf.profiler.experimental.start(directory)
  try:
    run_loop(steps)
  finally:
    tf.profiler.experimental.stop()
