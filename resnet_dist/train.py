"""The host side of a run, in the order it happens:

  prepare()          every check that can fail cheaply: flags, data, model_dir
  Trainer(...)       model, optimizer and step, in the strategy's scope (trainer.py)
  resume()           the checkpoint to continue from, or the initial weights
  report_start()     what runs where, for how long, at what cost
  HostLoop.run()     the steps, and when to log, save, evaluate, profile and stop
  write_summary()    summary.json and the closing lines

run(config) calls them in that order; evaluate(config, checkpoint) reuses the
first two. The Trainer owns one step; the HostLoop owns everything between
steps, so a recipe feature goes in one of the two: per-step work (an EMA of
the weights, gradient accumulation) in Trainer.replica_step, what is saved
and evaluated in Trainer.checkpoint_state and HostLoop.evaluate, a change of
input during the run (progressive resizing) in HostLoop.input_from.
"""

import contextlib
import dataclasses
import json
import math
import os
import shlex
import time
from typing import Optional

import tensorflow as tf

from resnet_dist import checkpoints, data, models, monitor, optim, perf, preemption, run_lock
from resnet_dist import watchdog
from resnet_dist import cluster as cluster_lib
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config
from resnet_dist.data import service
from resnet_dist.errors import ConfigError, DataError
from resnet_dist.models import weights
from resnet_dist.trainer import Trainer


# --- Preparing a run ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunSetup:
  """What a run trains on and where, settled before any model is built."""
  config: Config
  strategy: tf.distribute.Strategy
  source: data.Source
  input_spec: data.InputSpec
  model_dir: str
  init_path: str          # --init_checkpoint's checkpoint, or ""
  train_size: int
  eval_size: int
  steps_per_epoch: int
  total_steps: int
  service_workers: int = 0  # the tf.data service's workers at start; 0: local input
  run_name: str = ""        # the job this process is one task of (cluster.run_name)

  @property
  def chief(self):
    return strategy_lib.is_chief(self.strategy)


def create_strategy(config):
  return strategy_lib.create_strategy(config.distribute)


def open_source(config, strategy):
  """The dataset, once the (micro-)batch is known to divide among the replicas."""
  data.check_batch_divides(config.schedule.micro_batch_size, strategy.num_replicas_in_sync)
  d = config.data
  return data.get_source(d.dataset, d.data_dir, download=d.download, num_classes=d.num_classes,
                         image_size=d.image_size, cache=d.cache_data)


def input_spec(config):
  """What the training input makes; evaluation's is eval_input(...) of it."""
  d = config.data
  return data.InputSpec(
      global_batch_size=config.schedule.micro_batch_size, image_size=d.image_size,
      seed=config.execution.seed, shuffle_buffer=d.shuffle_buffer, strict=d.strict_data,
      augment=config.augment if config.augment.policy != "none" else None,
      crop_fraction=d.eval_crop_fraction, data_service=d.data_service,
      deterministic=config.execution.deterministic, crop=d.crop, interpolation=d.interpolation,
      antialias=d.antialias, repeats=d.repeated_augmentations,
      resize_first=d.eval_resize_size > 0)


def eval_input(config, spec):
  """Evaluation reads its split here, exactly once, with or without a service."""
  return dataclasses.replace(spec, image_size=config.data.eval_size, data_service="")


def prepare(config, strategy):
  """Seeds, opens and probes the data (and the tf.data service), checks
  model_dir: a RunSetup, or a ConfigError before anything is built or written."""
  d, schedule = config.data, config.schedule
  strategy_lib.check_tasks_agree(strategy, config.flag_values())
  service_workers = (service.wait_for_workers(d.data_service, d.data_service_timeout_seconds)
                     if d.data_service else 0)
  if config.execution.deterministic:
    tf.config.experimental.enable_op_determinism()
  source = open_source(config, strategy)
  read_splits = [source.train_split] + ([] if schedule.skip_eval else [source.eval_split])
  for split_name in dict.fromkeys(read_splits):  # once each, in this order
    data.check_decodable(source.split(split_name), split_name)
  init_checkpoint = config.checkpoint.init_checkpoint
  init_path = checkpoints.find_initial_weights(init_checkpoint) if init_checkpoint else ""
  if weights.is_weights_file(init_path):
    source = _pretrained_normalization(source, strategy)
  model_dir = checkpoints.resolve_model_dir(config)
  if strategy_lib.is_chief(strategy):
    checkpoints.check_writable(model_dir)
  train_size = source.split(source.train_split).num_examples
  epoch = data.repeated_epoch(train_size, d.repeated_augmentations,
                              strategy.num_replicas_in_sync)
  if epoch < schedule.global_batch_size:
    raise ConfigError(f"--repeated_augmentations={d.repeated_augmentations}: an epoch of "
                      f"{train_size} examples holds {epoch} once rounded down to a multiple of "
                      f"256, fewer than --global_batch_size={schedule.global_batch_size}")
  steps_per_epoch = max(epoch // schedule.global_batch_size, 1)
  _check_ramp(d.progressive_resize, schedule.total_steps(steps_per_epoch) / steps_per_epoch)
  # Slack: the last prefetch leaves the host's cores to an accelerator's
  # step launches at the start of each step (TensorFlow's advice for TPUs).
  spec = dataclasses.replace(input_spec(config), slack=not strategy_lib.all_on_cpu(strategy))
  if d.data_service:
    spec = dataclasses.replace(spec, job_name=service.job_prefix(model_dir))
  return RunSetup(
      config=config, strategy=strategy, source=source, input_spec=spec,
      model_dir=model_dir, init_path=init_path, train_size=train_size,
      eval_size=source.split(source.eval_split).num_examples,
      steps_per_epoch=steps_per_epoch, total_steps=schedule.total_steps(steps_per_epoch),
      service_workers=service_workers, run_name=_run_name(config.distribute))


def _run_name(distribute):
  cluster = cluster_lib.from_environment(distribute.cluster, port=distribute.cluster_port)
  return cluster_lib.run_name(cluster, distribute.tpu or os.environ.get("TPU_NAME", ""))


def _check_ramp(progressive_resize, epochs):
  """A --progressive_resize ramp that ends after the run's last epoch would
  never reach its last size: a ConfigError."""
  if progressive_resize is None:
    return
  start, end, _, last = progressive_resize
  if last > epochs:
    raise ConfigError(
        f"--progressive_resize={start}:{end}:{':'.join(f'{v:g}' for v in progressive_resize[2:])}"
        f" ramps until epoch {last:g}, after the run's last ({epochs:g}): it would never train "
        f"at {end}; end the ramp by epoch {epochs:g}")


def _pretrained_normalization(source, strategy):
  """Published ImageNet weights expect RGB normalised by ImageNet's mean and
  std, whatever the dataset: their first layer never saw anything else."""
  mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
  if (tuple(source.mean), tuple(source.std)) != (mean, std):
    monitor.log(f"normalising {source.name} by ImageNet's mean and std, as the pretrained "
                f"weights expect (not its own {tuple(source.mean)}, {tuple(source.std)})",
                strategy_lib.is_chief(strategy))
    source = dataclasses.replace(source, mean=mean, std=std)
  return source


def run(config: Config, strategy=None):
  """Trains (or resumes) a run; returns the summary written to model_dir/summary.json."""
  config.validate()
  setup = prepare(config, strategy or create_strategy(config))
  with run_lock.run_lock(setup.model_dir, setup.chief, setup.run_name):
    checkpoints.check_resumable(setup.model_dir, config, setup.source)
    trainer = Trainer(config, setup.strategy, setup.source,
                      steps_per_epoch=setup.steps_per_epoch, total_steps=setup.total_steps)
    resumed = resume(setup, trainer)
    # Written once the model is built and its weights are in: a start that
    # fails before leaves the model_dir as it was.
    if setup.chief:
      checkpoints.write_run_record(setup.model_dir, config, setup.source, setup.total_steps)
    checkpoints.save_class_names(setup.model_dir, setup.source, setup.chief)
    finished = finished_summary(setup, resumed.start_step)
    if finished:
      return finished
    cost = report_start(setup, trainer, resumed)
    loop = HostLoop(setup, trainer, resumed, cost)
    with loop.watch_service():  # to the end: the summary's input probe reads from it too
      loop.run()
      return write_summary(setup, trainer, cost, loop)


# --- Resuming and reporting ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Resumed:
  manager: tf.train.CheckpointManager   # saves the run's checkpoints from here on
  start_step: int
  restored: Optional[str]               # the checkpoint restored, if any


def resume(setup, trainer):
  """Restores model_dir's newest readable checkpoint (or, in a new run, the
  --init_checkpoint weights) into the trainer."""
  options, chief = setup.config.checkpoint, setup.chief
  checkpoint = tf.train.Checkpoint(**trainer.checkpoint_state())
  if options.start_over and chief:
    checkpoints.remove_checkpoints(setup.model_dir)
  existing = ([] if options.start_over else
              checkpoints.saved_checkpoints(checkpoints.checkpoint_dir(setup.model_dir)))
  restored = checkpoints.restore_latest(checkpoint, existing, chief)
  manager = checkpoints.save_manager(checkpoint, setup.strategy, setup.model_dir,
                                     keep=options.keep_checkpoints, existing=existing)
  if setup.init_path and not restored:
    fresh = checkpoints.init_from(trainer.model, setup.init_path)
    monitor.log(f"initial weights from {setup.init_path}"
                + (f"; a fresh classifier ({', '.join(fresh)})" if fresh else ""), chief)
  if not restored:
    trainer.reset_ema()
  return Resumed(manager, int(trainer.step.numpy()), restored)


@dataclasses.dataclass(frozen=True)
class Cost:
  num_params: int
  macs: int             # of one forward pass of one image; 0 off the chief
  peak_flops: float     # of all replicas; 0 off the chief


def report_start(setup, trainer, resumed):
  """Prints what runs where, on what and for how long; returns the run's cost."""
  config, strategy, chief = setup.config, setup.strategy, setup.chief
  num_params = sum(int(tf.size(v)) for v in trainer.variables)
  macs = models.count_macs(trainer.model, config.data.image_size) if chief else 0
  peak_flops = 0.0
  if chief:
    peak_flops = config.monitor.peak_tflops * 1e12 or perf.measure_peak_flops(
        strategy, trainer.model.compute_dtype, seconds=0.25)
  monitor.log(monitor.describe_run(
      config, strategy, setup.source, train_size=setup.train_size, eval_size=setup.eval_size,
      num_params=num_params, macs=macs, steps_per_epoch=setup.steps_per_epoch,
      total_steps=setup.total_steps, model_dir=setup.model_dir,
      all_reduce=trainer.all_reduce.describe(trainer.variables),
      xla_scope=trainer.xla_scope), chief)
  warning = perf.emulated_precision_warning(config.model.dtype, strategy_lib.all_on_cpu(strategy))
  if warning:
    monitor.log(warning, chief)
  if peak_flops:
    monitor.log(f"peak       {peak_flops / 1e9:.1f} GFLOP/s ({trainer.model.compute_dtype} "
                f"matmul, {'given' if config.monitor.peak_tflops else 'measured'})", chief)
  if setup.service_workers:
    monitor.log(f"input      tf.data service at {config.data.data_service}, "
                f"{setup.service_workers} worker{'s' if setup.service_workers > 1 else ''}; "
                "evaluation reads here", chief)
  else:
    order = ("in order (--deterministic)" if config.execution.deterministic else
             "out of order, each as soon as it is ready")
    monitor.log(f"input      training examples {order}; {data.input_threads()} decoding "
                "threads, autotuned", chief)
  if resumed.start_step:
    monitor.log(f"resuming from step {resumed.start_step} ({resumed.restored})", chief)
    report_new_length(setup, trainer, resumed.start_step)
    if setup.service_workers:
      monitor.log("the data service starts at the split holding that step's data position; "
                  "examples in flight at the checkpoint may be seen twice, or not at all, in "
                  "this epoch", chief)
  if setup.source.eval_split == setup.source.train_split and not config.schedule.skip_eval:
    monitor.log(f"warning: {setup.source.name} has no evaluation split; evaluating on the "
                f"training split", chief)
  return Cost(num_params, macs, peak_flops)


def report_new_length(setup, trainer, step):
  """A resume with another --train_steps or --train_epochs: one line on what
  that does to the learning-rate schedule, and run.json records the new
  length for the next resume."""
  was = checkpoints.read_run(setup.model_dir).get("total_steps")
  if not was or was == setup.total_steps:
    return
  config = setup.config
  before = optim.LearningRate.of(config.optim, config.schedule.global_batch_size,
                                 setup.steps_per_epoch, was).value_at(step)
  monitor.log(f"the run was begun for {was} steps, now {setup.total_steps}: its learning-rate "
              f"schedule is recomputed over {setup.total_steps} (at step {step}: "
              f"{trainer.schedule.value_at(step):.4g}, not {before:.4g})", setup.chief)
  if setup.chief:
    checkpoints.record_total_steps(setup.model_dir, setup.total_steps)


# --- The host loop ------------------------------------------------------------

def train_image_size(setup, step):
  return setup.config.data.train_image_size(step / setup.steps_per_epoch)


def train_input(setup, step):
  """(dataset_fn, its InputSpec): the training input from `step` on, of
  images the size that step trains at. With --grad_accum_steps=N it yields
  micro-batches, N a step."""
  spec = dataclasses.replace(setup.input_spec, image_size=train_image_size(setup, step))
  if spec.data_service:  # a job of its own: each job's position is where it began
    spec = dataclasses.replace(spec, job_name=f"{spec.job_name}-step{step}")
  return data.train_dataset_fn(setup.source, setup.source.train_split, spec,
                               step * setup.config.schedule.grad_accum_steps), spec


class HostLoop:
  """Runs the steps in tf.function loops and decides, between loops, when to
  log, save, evaluate, profile and stop (the Trainer runs the steps).

  A loop ends at the first of: the end, --steps_per_loop, an evaluation, a
  checkpoint, a profile boundary. After it, in this order: summaries and the
  progress line, the non-finite check, a save, the stop a signal asked for,
  an evaluation.
  """

  def __init__(self, setup, trainer, resumed, cost):
    config = setup.config
    self.setup, self.config, self.trainer, self.cost = setup, config, trainer, cost
    self.manager = resumed.manager
    self.start_step = self.step = resumed.start_step
    self.summaries = monitor.Summaries(setup.model_dir, setup.chief)
    self.profiler = monitor.Profiler(setup.model_dir, config.monitor.profile_steps, setup.chief)
    self.eval_every = (round(config.schedule.epochs_between_evals * setup.steps_per_epoch)
                       if config.schedule.epochs_between_evals > 0 else 0)
    # Every epoch by default: a crash, an OOM or a SIGKILL then loses at most one.
    self.save_every = config.checkpoint.checkpoint_every_steps or setup.steps_per_epoch
    self.resize_steps = self._resize_steps()
    self.timed_loops = []   # LoopStats of every loop but the first, which includes tracing
    self.last = {"loss": float("nan"), "top1": float("nan")}
    self.eval_result = self.ema_result = None
    self.stop_request = None  # run()'s, while it runs
    self.progress = None      # run()'s watchdog.Watchdog, while it runs
    self.service_watch = None

  def image_size_at(self, step):
    return train_image_size(self.setup, step)

  def _resize_steps(self):
    """The steps at which --progressive_resize changes the training size."""
    if self.config.data.progressive_resize is None:
      return []
    per_epoch = self.setup.steps_per_epoch
    _, _, first, last = self.config.data.progressive_resize
    ramp = range(max(math.floor(first * per_epoch), 1),
                 min(math.ceil(last * per_epoch), self.setup.total_steps) + 1)
    return [s for s in ramp if self.image_size_at(s) != self.image_size_at(s - 1)]

  def input_from(self, step):
    """The training iterator, positioned at `step` (see train_input)."""
    dataset_fn, spec = train_input(self.setup, step)
    self.fed_size = spec.image_size
    return iter(strategy_lib.distribute_input(self.setup.strategy, dataset_fn))

  def notices(self):
    """The preemption notices to stop at (--gce_metadata), without an earlier
    run's: the chief clears those first."""
    url = self.config.checkpoint.gce_metadata
    if not url:
      return None
    notices = preemption.Notices(url, os.path.join(self.setup.model_dir, "notices"))
    if self.setup.chief:
      notices.clear()
    return notices

  def resize_input(self, feed):
    """A new iterator where --progressive_resize changes the size: the loop
    function then traces (and compiles, with XLA or on TPUs) once more."""
    size = self.image_size_at(self.step)
    if size != self.fed_size:
      old = [feed.pop()]
      feed.append(self.input_from(self.step))
      strategy_lib.drop_in_background(old)
      monitor.log(f"training images are {size}x{size} from step {self.step}", self.setup.chief)

  def run(self):
    """Trains from the resumed step to the end; raises preemption.Preempted
    when a signal stopped the run (after saving)."""
    total = self.setup.total_steps
    # From here a SIGTERM or SIGINT asks the loop to stop after a step and
    # save; the watchdog ends a run that stops making progress, or that
    # cannot reach the end of a step to honour a stop.
    with self.watch_progress() as progress, preemption.StopRequest(
        self.trainer.stop_requested, self.notices(),
        on_stop=progress.stop_requested) as stop_request:
      self.stop_request = stop_request
      feed = [self.input_from(self.step)]  # its only reference, for drop_in_background()
      try:
        self.write_start_summaries()
        while self.step < total:
          self.resize_input(feed)
          stop = self.next_stop()
          progress.progress(f"in training steps {self.step + 1} to {stop}")
          stopped = self.train_until(stop, feed[0])
          progress.progress(f"after step {self.step}")
          self.between_loops(stopped, stop_request)
        self.profiler.at(self.step)
        self.profiler.close()
        if not self.config.schedule.skip_eval and (self.eval_result is None
                                          or self.eval_result["step"] != self.step):
          self.evaluate()
      finally:
        strategy_lib.drop_in_background(feed)
    self.summaries.flush()

  def watch_progress(self):
    """The run's watchdog (resnet_dist/watchdog.py), bound by
    --progress_timeout_seconds; its line names the input files open."""
    self.progress = watchdog.Watchdog(
        self.config.execution.progress_timeout_seconds,
        describe=self.waiting_on, before_exit=run_lock.release_locks)
    return self.progress

  def waiting_on(self):
    d = self.config.data
    # A folder dataset's images are under its path; the others' under --data_dir.
    root = d.dataset[len("folder:"):] if d.dataset.startswith("folder:") else d.data_dir
    files = watchdog.open_files_under(root)
    if not files:
      return "waiting for its input or for another task"
    return f"input files open: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"

  def watch_service(self):
    """With a tf.data service, a thread that warns of lost service workers and
    stops the run when the dispatcher is gone (service.Watch); else nothing."""
    setup = self.setup
    if not setup.service_workers:
      return contextlib.nullcontext()
    self.service_watch = service.Watch(
        self.config.data.data_service, self.config.data.data_service_timeout_seconds,
        setup.service_workers, lambda line: monitor.log(line, setup.chief),
        before_exit=run_lock.release_locks)
    return self.service_watch

  def write_start_summaries(self):
    if self.setup.chief:
      with data.data_errors(self.setup.source.num_classes):
        images = _first_images(self.setup.source, self.setup.input_spec)
      self.summaries.start(self.config, images, step=self.start_step, macs=self.cost.macs,
                           peak_flops=self.cost.peak_flops)

  def next_stop(self):
    """The step at which the next loop returns to Python."""
    per_loop = self.config.schedule.steps_per_loop
    stops = [self.setup.total_steps, (self.step // per_loop + 1) * per_loop]
    stops += [s for s in self.resize_steps if s > self.step][:1]
    for every in (self.eval_every, self.save_every):
      if every:
        stops.append((self.step // every + 1) * every)
    stops += [s for s in self.profiler.stops() if s > self.step]
    return min(stops)

  def train_until(self, stop, iterator):
    """One tf.function loop up to step `stop`; returns whether a signal to
    some worker stopped every worker early."""
    trainer = self.trainer
    self.profiler.at(self.step)
    trainer.train_metrics.reset()
    trainer.grad_norm_sum.assign(0.0)
    trainer.input_seconds.assign(0.0)
    began = time.perf_counter()
    with data.data_errors(self.setup.source.num_classes):
      stopped = bool(trainer.train_loop(iterator, tf.constant(stop - self.step)))
    elapsed = time.perf_counter() - began
    self.last = trainer.train_metrics.result()
    previous, self.step = self.step, int(trainer.step.numpy())
    stats = monitor.LoopStats(
        step=self.step, num_steps=self.step - previous, seconds=elapsed,
        input_seconds=float(trainer.input_seconds.numpy()) if trainer.times_input else None,
        global_batch_size=self.config.schedule.global_batch_size,
        num_replicas=self.setup.strategy.num_replicas_in_sync,
        flops_per_image=perf.training_flops_per_image(self.cost.macs),
        peak_flops=self.cost.peak_flops)
    if previous != self.start_step:
      self.timed_loops.append(stats)
    self.report_loop(stats)
    return stopped

  def report_loop(self, stats):
    """TensorBoard, the progress line, and the non-finite check."""
    trainer, step, config = self.trainer, self.step, self.config
    lr = trainer.schedule.value_at(step - 1)
    self.summaries.write_train(
        stats, self.last, lr=lr,
        grad_norm=float(trainer.grad_norm_sum.read_value()) / stats.num_steps,
        skipped_records=float(trainer.skipped_records.read_value()),
        loss_scale=trainer.loss_scale.scale.read_value() if trainer.loss_scale else None)
    if not math.isfinite(self.last["loss"]):
      raise FloatingPointError(f"non-finite training loss at step {step}; {self.last_good()}")
    previous = step - stats.num_steps
    if (step // config.monitor.log_every_steps != previous // config.monitor.log_every_steps
        or step == self.setup.total_steps):
      monitor.log(monitor.progress_line(
          step, self.setup.total_steps, steps_per_epoch=self.setup.steps_per_epoch,
          metrics=self.last, lr=lr, stats=stats), self.setup.chief)

  def between_loops(self, stopped, stop_request):
    step, total = self.step, self.setup.total_steps
    at_eval = self.eval_every and step % self.eval_every == 0
    if at_eval or step % self.save_every == 0 or step == total or stopped:
      self.save()
    if stopped and step < total:
      self.profiler.close()
      self.summaries.flush()
      reason = stop_request.reason or "a signal to another worker"
      # On every task: each one's last line says why it ended.
      monitor.log(f"{reason}: saved a checkpoint at step {step}; run again to resume")
      raise preemption.Preempted(step, reason)
    if at_eval and not self.config.schedule.skip_eval and step < total:
      self.evaluate()

  def save(self):
    """A checkpoint of this step; never one of non-finite weights."""
    self.progress.progress(f"saving the checkpoint of step {self.step}")
    self.trainer.sync_moving_statistics()
    if not bool(self.trainer.weights_finite()):
      raise FloatingPointError(f"non-finite weights at step {self.step}; {self.last_good()}")
    checkpoints.save(self.manager, self.step, self.setup.chief)

  def evaluate(self):
    """The weights, and their EMA where the run keeps one. Every evaluation
    follows a save, so a signal during one stops it at once: the run exits
    as a signal in training does, with nothing lost."""
    setup = self.setup
    self.progress.progress(f"evaluating at step {self.step}")
    spec = eval_input(self.config, setup.input_spec)
    self.eval_result = evaluate_split(self.trainer, setup.source, setup.source.eval_split,
                                      spec)
    self.stop_if_asked()
    monitor.log(monitor.eval_line(self.eval_result, setup.eval_size), setup.chief)
    self.summaries.write_eval(self.eval_result)
    if self.trainer.ema_model is not None:
      self.ema_result = evaluate_split(self.trainer, setup.source, setup.source.eval_split,
                                       spec, ema=True)
      self.stop_if_asked()
      monitor.log(monitor.eval_line(self.ema_result, setup.eval_size, of_ema=True), setup.chief)
      self.summaries.write_eval(self.ema_result, ema=True)

  def stop_if_asked(self):
    """Preempted when this process, the whole run, got a signal during an
    evaluation (Trainer.stops_alone)."""
    if self.trainer.stops_alone and self.stop_request.requested_here:
      self.summaries.flush()
      reason = self.stop_request.reason
      monitor.log(f"{reason}: stopped the evaluation at step {self.step}, whose checkpoint is "
                  f"saved; run again to resume (or to evaluate, if training was over)")
      raise preemption.Preempted(self.step, reason)

  def last_good(self):
    if self.manager.latest_checkpoint:
      return f"the last good checkpoint is {self.manager.latest_checkpoint}"
    return "no checkpoint was saved before it"


def _first_images(source, spec):
  """A training batch as the model sees it, for TensorBoard: the stream's
  first, so a resumed streamed dataset does not skip up to an epoch of raw
  records for it, and a small shuffle buffer, so it does not fill 10,000."""
  spec = dataclasses.replace(spec, shuffle_buffer=1, strict=False, data_service="")
  dataset = data.train_dataset_fn(source, source.train_split, spec)(
      tf.distribute.InputContext())
  return next(iter(dataset.take(1)))[0]


# --- The summary --------------------------------------------------------------

def _timed_rates(loop, config):
  """Throughput, input wait and FLOP utilisation over the timed loops."""
  loops = loop.timed_loops
  timed = sum(s.seconds for s in loops)
  if not timed:
    return {"examples_per_second": None, "input_wait_fraction": None, "flop_utilization": None}
  return {
      "examples_per_second": (sum(s.num_steps for s in loops)
                              * config.schedule.global_batch_size / timed),
      "input_wait_fraction": (sum(s.input_seconds for s in loops) / timed
                              if loop.trainer.times_input else None),
      "flop_utilization": (sum(s.flop_utilization * s.seconds for s in loops) / timed
                           if loop.cost.peak_flops else None),
  }


def probe_input(setup, step, seconds):
  """Images/s the chief's input pipeline makes alone, from `step` on, in
  `seconds` after two batches of warm-up (training is over: it has the host)."""
  strategy = setup.strategy
  context = tf.distribute.InputContext(strategy_lib.num_input_pipelines(strategy), 0,
                                       strategy.num_replicas_in_sync)
  dataset_fn, spec = train_input(setup, step)
  dataset = dataset_fn(context)
  per_batch = context.get_per_replica_batch_size(spec.global_batch_size)
  holder = [iter(dataset)]
  try:
    with data.data_errors(setup.source.num_classes):
      for _ in range(2):
        next(holder[0])
      batches, began = 0, time.perf_counter()
      while time.perf_counter() - began < seconds:
        next(holder[0])
        batches += 1
      return batches * per_batch / (time.perf_counter() - began)
  finally:
    strategy_lib.drop_in_background(holder)


def input_verdict(setup, loop, rates):
  """Whether the run waited on its input (perf.input_verdict): from the timed
  wait, or else, on the chief of a run long enough, from a probe of the
  input pipeline alone."""
  rate = rates["examples_per_second"]
  per_pipeline = rate / strategy_lib.num_input_pipelines(setup.strategy) if rate else None
  timed = sum(s.seconds for s in loop.timed_loops)
  pipeline_rate = None
  if (rates["input_wait_fraction"] is None and per_pipeline and setup.chief
      and timed >= perf.PROBE_AFTER_SECONDS):
    pipeline_rate = probe_input(setup, loop.step, perf.PROBE_SECONDS)
  return perf.input_verdict(rates["input_wait_fraction"], per_pipeline, pipeline_rate,
                            setup.service_workers)


def finished_summary(setup, step):
  """The summary of a run already trained to its last step and evaluated,
  kept as it is: its figures are the finished run's, and a rerun (the way to
  resume) has nothing to add. None for a run with steps or its final
  evaluation to go. Every worker reads the shared model_dir alike."""
  path = os.path.join(setup.model_dir, checkpoints.SUMMARY_FILE)
  if step < setup.total_steps or not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    summary = json.load(f)
  if summary.get("global_step") != step:  # an earlier, shorter run's
    return None
  monitor.log(f"already finished at step {step}: nothing to train; summary in {path}",
              setup.chief)
  return summary


def _strict_json(value):
  """value with NaN and infinities as null, which every JSON parser reads."""
  if isinstance(value, dict):
    return {k: _strict_json(v) for k, v in value.items()}
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_summary(setup, trainer, cost, loop):
  """The run's results and settings, in model_dir/summary.json (chief) and returned."""
  config, strategy, result = setup.config, setup.strategy, loop.eval_result or {}
  rates = _timed_rates(loop, config)
  summary = {
      "global_step": loop.step,
      "train_loss": loop.last["loss"],
      "train_top1": loop.last["top1"],
      "eval_loss": result.get("loss"),
      "eval_top1": result.get("top1"),
      "eval_top5": result.get("top5"),
      "eval_examples": int(result.get("count", 0)),
      **({f"eval_{key}_ema": loop.ema_result[key] for key in ("loss", "top1", "top5")}
         if loop.ema_result else {}),
      "eval_split_examples": setup.eval_size,
      # A service's workers skip undecodable images without counting them.
      "skipped_train_records": (None if setup.service_workers else
                                round(float(trainer.skipped_records.read_value()))),
      **({"data_service": {"address": config.data.data_service,
                           "workers_at_start": setup.service_workers,
                           "workers_at_end": loop.service_watch.workers}}
         if setup.service_workers else {}),
      **rates,
      "input_bound": input_verdict(setup, loop, rates),
      "gmacs_per_image": cost.macs / 1e9,
      "peak_gflops": cost.peak_flops / 1e9,
      "cpu_kernels": perf.cpu_kernels(),
      "strategy": strategy_lib.kind_of(strategy),
      "num_replicas": strategy.num_replicas_in_sync,
      "model": config.model.name,
      "resnet_variant": config.model.resnet_variant,
      "dataset": config.data.dataset,
      "dtype": config.model.dtype,
      "global_batch_size": config.schedule.global_batch_size,
      "trainable_parameters": cost.num_params,
      "model_dir": setup.model_dir,
  }
  summary = _strict_json(summary)
  if not setup.chief:  # every task's last line says how it ended
    monitor.log(f"finished at step {loop.step}{strategy_lib.describe_tasks(strategy)}; the "
                f"chief writes the run's summary")
  if setup.chief:
    path = os.path.join(setup.model_dir, checkpoints.SUMMARY_FILE)
    with tf.io.gfile.GFile(path, "w") as f:
      json.dump(summary, f, indent=2, allow_nan=False)
    rate, top1 = summary["examples_per_second"], summary["eval_top1"]
    monitor.log(summary["input_bound"]["verdict"])
    monitor.log(f"done: {loop.step} steps"
                + (f", eval top-1 {top1:.4f}" if top1 is not None else "")
                + (f", {rate:.0f} images/s" if rate else "") + "\n"
                f"checkpoints in {loop.manager.directory}, summary in {path}\n"
                f"look at the run: tensorboard --logdir {shlex.quote(setup.model_dir)}")
  return summary


# --- Evaluation ---------------------------------------------------------------

def evaluate_split(trainer, source, split_name, spec, ema=False):
  """Loss, top-1, top-5 and count over a whole split, every example exactly
  once; of the weights' EMA when ema."""
  strategy = trainer.strategy
  split = source.split(split_name)
  steps = data.eval_steps(split, spec.global_batch_size,
                          strategy_lib.num_input_pipelines(strategy))
  trainer.eval_metrics.reset()
  trainer.sync_moving_statistics()
  dataset = strategy_lib.distribute_input(strategy,
                                          data.eval_dataset_fn(source, split_name, spec))
  with data.data_errors(source.num_classes):
    trainer.eval_loop(iter(dataset), tf.constant(steps), ema)
  result = trainer.eval_metrics.result()
  if not result["count"] and not bool(trainer.stop_requested.numpy()):  # (stopped: nothing read)
    raise DataError(f"no image of the {split_name} split ({split.num_examples} records) "
                    f"could be decoded")
  return {**result, "step": int(trainer.step.numpy())}


def evaluate(config: Config, checkpoint_path, split_name=None, strategy=None, use_ema=False):
  """Evaluates the model of a checkpoint on a split (default: the eval split);
  use_ema: the EMA of its weights, which the checkpoint must hold."""
  config.validate()
  strategy = strategy or create_strategy(config)
  source = open_source(config, strategy)
  split_name = split_name or source.eval_split
  trainer = Trainer(config.replace(ema_decay=0.0), strategy, source,
                    steps_per_epoch=1, total_steps=1)
  checkpoints.restore_model(trainer.model, checkpoint_path,
                            checkpoints.EMA_KEY if use_ema else checkpoints.MODEL_KEY)
  result = evaluate_split(trainer, source, split_name, eval_input(config, input_spec(config)))
  result.update(checkpoint=checkpoint_path, split=split_name,
                split_examples=source.split(split_name).num_examples)
  del result["step"]
  return result
