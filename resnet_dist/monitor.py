"""What a run shows: the console block and progress lines, TensorBoard
summaries under model_dir/train and model_dir/eval, and profiler traces.

Only the chief prints progress and writes summaries; the host loop calls in
here once per loop, never per step inside it.
"""

import dataclasses
import datetime
import os
import sys

import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from resnet_dist import perf
from resnet_dist import strategy as strategy_lib
from resnet_dist.data import augment as augment_lib

NUM_IMAGES_SHOWN = 8


def log(message, chief=True):
  if chief:
    print(message, flush=True)


def warn(message, chief=True):
  """A warning a watcher of the run must see: on stdout with the run's other
  lines, and on stderr, which a healthy run leaves empty."""
  if chief:
    print(f"warning: {message}", flush=True)
    print(f"warning: {message}", file=sys.stderr, flush=True)


# What the start block says XLA compiles (strategy.xla_scope).
_XLA_SCOPES = {"": "", "step": ", XLA (the whole replica step)",
               "gradients": ", XLA (forward and backward; TensorFlow's collectives "
                            "all-reduce, then the update runs)"}


def describe_run(config, strategy, source, *, train_size, eval_size, num_params, macs,
                 steps_per_epoch, total_steps, model_dir, all_reduce, xla_scope=""):
  """The block printed at start: what runs where, on what, for how long."""
  model, schedule, size = config.model, config.schedule, config.data.image_size
  per_replica = schedule.global_batch_size // strategy.num_replicas_in_sync
  recipe = describe_recipe(config)
  devices = ", ".join(strategy_lib.replica_devices(strategy))
  return "\n".join([
      f"strategy   {strategy_lib.kind_of(strategy)}: {strategy.num_replicas_in_sync} replica(s)"
      f"{strategy_lib.describe_tasks(strategy)}, on {devices}",
      f"all-reduce {all_reduce}",
      *([f"gpu        threads {strategy_lib.describe_gpu_threads()}"]
        if "GPU" in devices else []),
      f"batch      {schedule.global_batch_size} global, {per_replica} per replica",
      f"model      {model.name} ({model.resnet_variant}), {num_params:,} trainable "
      f"parameters, {macs / 1e9:.3f} GMACs per {size}x{size} image",
      f"dtype      {model.dtype}{_XLA_SCOPES[xla_scope]}; CPU kernels "
      f"{perf.cpu_kernels()}",
      f"dataset    {config.data.dataset}: {train_size:,} train / {eval_size:,} eval examples, "
      f"{source.num_classes} classes",
      f"schedule   {total_steps} steps ({total_steps / steps_per_epoch:.1f} epochs of "
      f"{steps_per_epoch}), {config.optim.optimizer}, base lr "
      f"{config.optim.base_learning_rate} per 256"
      + (f", {config.optim.loss} loss" if config.optim.loss != "softmax" else ""),
      *([f"recipe     {', '.join(recipe)}"] if recipe else []),
      f"model_dir  {model_dir}",
  ])


def describe_recipe(config):
  """The recipe features a run has on, in words; [] for none."""
  options, optimizer, data_config = config.augment, config.optim, config.data
  parts = []
  if config.schedule.grad_accum_steps > 1:
    parts.append(f"{config.schedule.grad_accum_steps} micro-batches of "
                 f"{config.schedule.micro_batch_size} a step")
  if options.policy != "none":
    parts.append(augment_lib.build(options).describe())
  if options.random_erasing:
    parts.append(f"random erasing {options.random_erasing:g}")
  for name, alpha in (("mixup", options.mixup_alpha), ("cutmix", options.cutmix_alpha)):
    if alpha:
      parts.append(f"{name} {alpha:g}")
  if optimizer.label_smoothing:
    parts.append(f"label smoothing {optimizer.label_smoothing:g}")
  if optimizer.ema_decay:
    parts.append(f"EMA {optimizer.ema_decay:g} every {optimizer.ema_every_steps}")
  if data_config.progressive_resize:
    start, end, first, last = data_config.progressive_resize
    parts.append(f"train {start}->{end} px over epochs {first:g}-{last:g}")
  if data_config.eval_size != data_config.image_size or data_config.eval_resize_size:
    parts.append(f"eval at {data_config.eval_size}"
                 + (f" of {data_config.eval_resize_size}" if data_config.eval_resize_size
                    else ""))
  return parts


def progress_line(step, total_steps, steps_per_epoch, metrics, lr, stats):
  images_per_second = stats.images_per_second
  remaining = (total_steps - step) * stats.global_batch_size / max(images_per_second, 1e-9)
  return (f"step {step}/{total_steps} epoch {step / steps_per_epoch:.2f} "
          f"loss {metrics['loss']:.4f} top-1 {metrics['top1']:.3f} lr {lr:.4g} "
          f"{images_per_second:.0f} images/s "
          + (f"(input wait {100 * stats.input_fraction:.0f}%) "
             if stats.input_fraction is not None else "") +
          f"ETA {datetime.timedelta(seconds=round(remaining))}")


def eval_line(result, split_size, of_ema=False):
  skipped = split_size - int(result["count"])
  return (f"eval{' (EMA)' if of_ema else ''} at step {result['step']}: loss {result['loss']:.4f} "
          f"top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} "
          f"over {int(result['count'])} examples"
          + (f" ({skipped} undecodable, skipped)" if skipped > 0 else ""))


@dataclasses.dataclass
class LoopStats:
  """What one host loop measured; the summaries' and the progress line's inputs."""
  step: int
  num_steps: int
  seconds: float            # wall time of the loop
  input_seconds: float      # of which waiting for the input pipeline; None: not timed
  global_batch_size: int
  num_replicas: int
  flops_per_image: float    # training FLOPs of one image
  peak_flops: float         # the hardware's FLOP/s; 0: unknown

  @property
  def images_per_second(self):
    return self.num_steps * self.global_batch_size / self.seconds

  @property
  def input_fraction(self):
    return None if self.input_seconds is None else min(self.input_seconds / self.seconds, 1.0)

  @property
  def flop_utilization(self):
    return self.images_per_second * self.flops_per_image / self.peak_flops if self.peak_flops else 0.0


# The TensorBoard runs a model_dir holds, one directory each.
SUMMARY_DIRS = ("train", "eval", "eval_ema")


class Summaries:
  """TensorBoard writers for train and eval (no-op writers off the chief)."""

  def __init__(self, model_dir, chief):
    self.model_dir = model_dir
    self.chief = chief
    if chief:
      self.train = tf.summary.create_file_writer(os.path.join(model_dir, "train"))
      self.eval = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))
    else:
      self.train = self.eval = tf.summary.create_noop_writer()

  def start(self, config, images, step, macs, peak_flops):
    """At start: the run's flags (hparams plugin), some input images, the model's cost."""
    hparams = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v
               for k, v in config.flag_values().items()
               if isinstance(v, (bool, int, float, str, tuple))}
    with self.train.as_default(step=step):
      hparams_api.hparams(hparams)
      tf.summary.image("input_images", images[:NUM_IMAGES_SHOWN], max_outputs=NUM_IMAGES_SHOWN)
      tf.summary.scalar("model/gmacs_per_image", macs / 1e9)
      if peak_flops:
        tf.summary.scalar("model/peak_gflops", peak_flops / 1e9)

  def write_train(self, stats, metrics, lr, grad_norm, skipped_records, loss_scale=None):
    with self.train.as_default(step=stats.step):
      for key in ("loss", "top1", "top5"):
        tf.summary.scalar(key, metrics[key])
      tf.summary.scalar("learning_rate", lr)
      tf.summary.scalar("gradient_norm", grad_norm)
      tf.summary.scalar("perf/examples_per_second", stats.images_per_second)
      tf.summary.scalar("perf/examples_per_second_per_replica",
                        stats.images_per_second / stats.num_replicas)
      tf.summary.scalar("perf/step_time_ms", 1000 * stats.seconds / stats.num_steps)
      if stats.input_fraction is not None:
        tf.summary.scalar("perf/input_wait_fraction", stats.input_fraction)
      if stats.peak_flops:
        tf.summary.scalar("perf/flop_utilization", stats.flop_utilization)
      tf.summary.scalar("input/skipped_records", skipped_records)
      if loss_scale is not None:
        tf.summary.scalar("loss_scale", loss_scale)

  def write_eval(self, result, ema=False):
    """ema: the result of the weights' EMA, under eval_ema/."""
    if ema and not hasattr(self, "eval_ema"):
      self.eval_ema = (tf.summary.create_file_writer(os.path.join(self.model_dir, "eval_ema"))
                       if self.chief else tf.summary.create_noop_writer())
    with (self.eval_ema if ema else self.eval).as_default(step=result["step"]):
      for key in ("loss", "top1", "top5"):
        tf.summary.scalar(key, result[key])

  def flush(self):
    self.train.flush()
    self.eval.flush()
    if hasattr(self, "eval_ema"):
      self.eval_ema.flush()


class Profiler:
  """Traces steps [start, end) with tf.profiler into model_dir/plugins/profile,
  TensorBoard's Profile tab. The host loop stops at both steps (stops())."""

  def __init__(self, model_dir, profile_steps, chief):
    self.logdir = model_dir
    self.start, self.end = profile_steps or (0, 0)
    self.enabled = chief and self.end > self.start
    self.running = False

  def stops(self):
    return (self.start, self.end) if self.enabled else ()

  def at(self, step):
    """Called at every loop boundary with the step about to run."""
    if not self.enabled:
      return
    if step == self.start and not self.running:
      tf.profiler.experimental.start(self.logdir)
      self.running = True
    elif step >= self.end and self.running:
      tf.profiler.experimental.stop()
      self.running = False
      log(f"profile of steps {self.start}-{self.end} in {self.logdir}/plugins/profile")

  def close(self):
    if self.running:
      tf.profiler.experimental.stop()
      self.running = False
