"""The host loop: the steps in tf.function loops, and between them the run's
periodic actions (save, stop, evaluate, resize the input, profile).

Orbit's split: the Trainer says what N steps do and returns what they did
(trainer.Steps); the HostLoop decides when. A loop of steps ends at the
nearest of: the run's end, --steps_per_loop, and the next step any action
asks for. Between loops the actions run in the order of actions(), each when
it is due. A new periodic action is one more Action there.
"""

import dataclasses
import math
import os
from typing import Callable, List, Optional

import tensorflow as tf

from resnet_dist import checkpoints, data, monitor, perf, preemption, run_lock, watchdog
from resnet_dist import distributed_input
from resnet_dist.data import service
from resnet_dist.evaluation import Evaluator, eval_input


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


def resize_steps(setup):
  """The steps at which --progressive_resize changes the training size."""
  if setup.config.data.progressive_resize is None:
    return []
  per_epoch = setup.steps_per_epoch
  _, _, first, last = setup.config.data.progressive_resize
  ramp = range(max(math.floor(first * per_epoch), 1),
               min(math.ceil(last * per_epoch), setup.total_steps) + 1)
  return [s for s in ramp
          if train_image_size(setup, s) != train_image_size(setup, s - 1)]


@dataclasses.dataclass(frozen=True)
class Action:
  """Something the host loop does between loops of steps.

  due(step, stopped): whether it runs after the loop that ended at `step`
  (stopped: a stop asked of some process ended that loop early).
  next_at(step): the first step after `step` it must run at, where the next
  loop ends; None: it asks for no step of its own.
  """
  due: Callable[[int, bool], bool]
  run: Callable[[], None]
  next_at: Callable[[int], Optional[int]] = lambda step: None


def every(steps):
  """next_at for an action every `steps` steps (0: never)."""
  return lambda step: (step // steps + 1) * steps if steps else None


def at_steps(steps):
  """next_at for an action at the given steps."""
  steps = sorted(steps)
  return lambda step: next((s for s in steps if s > step), None)


@dataclasses.dataclass(frozen=True)
class Record:
  """What a finished HostLoop.run() leaves for the summary."""
  step: int
  last_train: dict                # the last loop's training metrics
  eval_result: Optional[dict]
  ema_result: Optional[dict]
  timed_loops: List[monitor.LoopStats]  # every loop but the first, which includes tracing
  input_timed: bool               # whether the loops timed their wait for input
  skipped_records: float
  checkpoint_dir: str
  service_workers: Optional[int]  # the tf.data service's workers at the end


class HostLoop:
  """Runs the steps in tf.function loops and, between loops, the actions."""

  def __init__(self, setup, trainer, resumed, cost):
    config = setup.config
    self.setup, self.config, self.trainer = setup, config, trainer
    self.evaluator = Evaluator(trainer)
    self.manager = resumed.manager
    self.start_step = self.step = resumed.start_step
    self.reporter = Reporter(setup, cost, resumed.start_step)
    self.profiler = monitor.Profiler(setup.model_dir, config.monitor.profile_steps, setup.chief)
    self.stop_request = None  # run()'s, while it runs
    self.progress = None      # run()'s watchdog.Watchdog, while it runs
    self.service_watch = None  # run()'s caller's service_watch(), if any
    self.feed = []            # the training iterator, its only reference (drop_in_background)
    self.actions = self._actions()

  def _actions(self):
    """Between loops, in this order: a save, the stop a signal asked for, an
    evaluation, a new input size, the profiler."""
    setup, schedule = self.setup, self.config.schedule
    total = setup.total_steps
    eval_every = (round(schedule.epochs_between_evals * setup.steps_per_epoch)
                  if schedule.epochs_between_evals > 0 else 0)
    # Every epoch by default: a crash, an OOM or a SIGKILL then loses at most one.
    save_every = self.config.checkpoint.checkpoint_every_steps or setup.steps_per_epoch
    at_eval = lambda step: bool(eval_every) and step % eval_every == 0
    return [
        Action(lambda step, stopped: (at_eval(step) or step % save_every == 0
                                      or step == total or stopped),
               self.save, every(save_every)),
        Action(lambda step, stopped: stopped and step < total, self.stop),
        Action(lambda step, _: at_eval(step) and not schedule.skip_eval and step < total,
               self.evaluate, every(eval_every)),
        Action(lambda step, _: step < total, self.resize_input, at_steps(resize_steps(setup))),
        Action(lambda step, _: True, lambda: self.profiler.at(self.step),
               lambda step: min((s for s in self.profiler.stops() if s > step), default=None)),
    ]

  def next_stop(self):
    """The step at which the next loop returns to Python."""
    per_loop = self.config.schedule.steps_per_loop
    stops = [self.setup.total_steps, (self.step // per_loop + 1) * per_loop]
    stops += [action.next_at(self.step) for action in self.actions]
    return min(s for s in stops if s is not None)

  def run(self):
    """Trains from the resumed step to the end and returns its Record;
    raises preemption.Preempted when a signal stopped the run (after saving)."""
    total = self.setup.total_steps
    # From here a SIGTERM or SIGINT asks the loop to stop after a step and
    # save; the watchdog ends a run that stops making progress, or that
    # cannot reach the end of a step to honour a stop.
    with watchdog_of(self.config) as self.progress, preemption.StopRequest(
        self.trainer.stop_requested, notices(self.setup),
        on_stop=self.progress.stop_requested) as self.stop_request:
      self.feed.append(self.input_from(self.step))
      try:
        self.reporter.start()
        self.profiler.at(self.step)
        while self.step < total:
          stop = self.next_stop()
          self.progress.progress(f"in training steps {self.step + 1} to {stop}")
          stopped = self.train_until(stop)
          self.progress.progress(f"after step {self.step}")
          for action in self.actions:
            if action.due(self.step, stopped):
              action.run()
        self.profiler.close()
        evaluated = self.reporter.eval_result
        if not self.config.schedule.skip_eval and (evaluated is None
                                                   or evaluated["step"] != self.step):
          self.evaluate()
      finally:
        distributed_input.drop_in_background(self.feed)
    self.reporter.summaries.flush()
    return self.reporter.record(
        self.step, input_timed=self.trainer.times_input,
        skipped_records=self.trainer.skipped_total(), checkpoint_dir=self.manager.directory,
        service_workers=self.service_watch.workers if self.service_watch else None)

  def train_until(self, stop):
    """One tf.function loop up to step `stop`; returns whether a signal to
    some worker stopped every worker early."""
    with data.data_errors(self.setup.source.num_classes):
      steps = self.trainer.train(self.feed[0], stop - self.step)
    previous, self.step = self.step, steps.step
    lr = self.trainer.learning_rate.value_at(self.step - 1)
    stats = self.reporter.write_loop(steps, previous, lr)
    if not math.isfinite(steps.metrics["loss"]):
      raise FloatingPointError(f"non-finite training loss at step {self.step}; {self.last_good()}")
    self.reporter.progress_line(stats, steps, lr)
    return steps.stopped

  # --- The actions -----------------------------------------------------------

  def save(self):
    """A checkpoint of this step; never one of non-finite weights."""
    self.progress.progress(f"saving the checkpoint of step {self.step}")
    self.trainer.sync_moving_statistics()
    if not bool(self.trainer.weights_finite()):
      raise FloatingPointError(f"non-finite weights at step {self.step}; {self.last_good()}")
    checkpoints.save(self.manager, self.step, self.setup.chief)

  def stop(self):
    """After the save of a loop a stop ended early: Preempted."""
    self.profiler.close()
    self.reporter.summaries.flush()
    reason = self.stop_request.reason or "a signal to another worker"
    # On every task: each one's last line says why it ended.
    monitor.log(f"{reason}: saved a checkpoint at step {self.step}; run again to resume")
    raise preemption.Preempted(self.step, reason)

  def evaluate(self):
    """The weights, and their EMA where the run keeps one. Every evaluation
    follows a save, so a signal during one stops it at once: the run exits
    as a signal in training does, with nothing lost."""
    setup = self.setup
    self.progress.progress(f"evaluating at step {self.step}")
    spec = eval_input(self.config, setup.input_spec)
    for ema in (False, True) if self.trainer.ema_model is not None else (False,):
      result = self.evaluator.evaluate(setup.source, setup.source.eval_split, spec, ema=ema)
      self.stop_if_asked()
      self.reporter.evaluated(result, ema)

  def stop_if_asked(self):
    """Preempted when this process, the whole run, got a signal during an
    evaluation (Evaluator.stops_alone)."""
    if self.evaluator.stops_alone and self.stop_request.requested_here:
      self.reporter.summaries.flush()
      reason = self.stop_request.reason
      monitor.log(f"{reason}: stopped the evaluation at step {self.step}, whose checkpoint is "
                  f"saved; run again to resume (or to evaluate, if training was over)")
      raise preemption.Preempted(self.step, reason)

  def resize_input(self):
    """A new iterator where --progressive_resize changes the size: the loop
    function then traces (and compiles, with XLA or on TPUs) once more."""
    size = train_image_size(self.setup, self.step)
    if size != self.fed_size:
      old = [self.feed.pop()]
      self.feed.append(self.input_from(self.step))
      distributed_input.drop_in_background(old)
      monitor.log(f"training images are {size}x{size} from step {self.step}", self.setup.chief)

  def last_good(self):
    if self.manager.latest_checkpoint:
      return f"the last good checkpoint is {self.manager.latest_checkpoint}"
    return "no checkpoint was saved before it"

  def input_from(self, step):
    """The training iterator, positioned at `step` (see train_input)."""
    dataset_fn, spec = train_input(self.setup, step)
    self.fed_size = spec.image_size
    return iter(distributed_input.distribute_input(self.setup.strategy, dataset_fn))

class Reporter:
  """What the host loop tells as it goes (TensorBoard, the progress and
  evaluation lines) and keeps for the summary (record())."""

  def __init__(self, setup, cost, start_step):
    self.setup, self.cost, self.start_step = setup, cost, start_step
    self.summaries = monitor.Summaries(setup.model_dir, setup.chief)
    self.timed_loops = []   # LoopStats of every loop but the first, which includes tracing
    self.last = {"loss": float("nan"), "top1": float("nan")}
    self.eval_result = self.ema_result = None

  def start(self):
    """The run's settings and a batch of its training images, in TensorBoard."""
    setup = self.setup
    if setup.chief:
      with data.data_errors(setup.source.num_classes):
        images = _first_images(setup.source, setup.input_spec)
      self.summaries.start(setup.config, images, step=self.start_step, macs=self.cost.macs,
                           peak_flops=self.cost.peak_flops)

  def write_loop(self, steps, previous, lr):
    """A loop's TensorBoard summaries; its LoopStats."""
    setup, self.last = self.setup, steps.metrics
    stats = monitor.LoopStats(
        step=steps.step, num_steps=steps.num_steps, seconds=steps.seconds,
        input_seconds=steps.input_seconds,
        global_batch_size=setup.config.schedule.global_batch_size,
        num_replicas=setup.strategy.num_replicas_in_sync,
        flops_per_image=perf.training_flops_per_image(self.cost.macs),
        peak_flops=self.cost.peak_flops)
    if previous != self.start_step:
      self.timed_loops.append(stats)
    self.summaries.write_train(stats, steps.metrics, lr=lr, grad_norm=steps.grad_norm,
                               skipped_records=steps.skipped_records,
                               loss_scale=steps.loss_scale)
    return stats

  def progress_line(self, stats, steps, lr):
    """Every --log_every_steps steps, and at the end."""
    setup, step, every = self.setup, stats.step, self.setup.config.monitor.log_every_steps
    if step // every != (step - stats.num_steps) // every or step == setup.total_steps:
      monitor.log(monitor.progress_line(
          step, setup.total_steps, steps_per_epoch=setup.steps_per_epoch,
          metrics=steps.metrics, lr=lr, stats=stats), setup.chief)

  def evaluated(self, result, ema=False):
    monitor.log(monitor.eval_line(result, self.setup.eval_size, of_ema=ema), self.setup.chief)
    self.summaries.write_eval(result, ema=ema)
    if ema:
      self.ema_result = result
    else:
      self.eval_result = result

  def record(self, step, **host):
    return Record(step=step, last_train=self.last, eval_result=self.eval_result,
                  ema_result=self.ema_result, timed_loops=self.timed_loops, **host)


def notices(setup):
  """The preemption notices to stop at (--gce_metadata), without an earlier
  run's: the chief clears those first."""
  url = setup.config.checkpoint.gce_metadata
  if not url:
    return None
  found = preemption.Notices(url, os.path.join(setup.model_dir, "notices"))
  if setup.chief:
    found.clear()
  return found


def watchdog_of(config):
  """The run's watchdog (resnet_dist/watchdog.py), bound by
  --progress_timeout_seconds; its line names the input files open."""
  return watchdog.Watchdog(config.execution.progress_timeout_seconds,
                           describe=lambda: _waiting_on(config.data),
                           before_exit=run_lock.release_locks)


def _waiting_on(data_config):
  # A folder dataset's images are under its path; the others' under --data_dir.
  d = data_config
  root = d.dataset[len("folder:"):] if d.dataset.startswith("folder:") else d.data_dir
  files = watchdog.open_files_under(root)
  if not files:
    return "waiting for its input or for another task"
  return f"input files open: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"


def service_watch(setup):
  """With a tf.data service, a thread that warns of lost service workers and
  stops the run when the dispatcher is gone (service.Watch); else None."""
  if not setup.service_workers:
    return None
  d = setup.config.data
  return service.Watch(d.data_service, d.data_service_timeout_seconds, setup.service_workers,
                       lambda line: monitor.log(line, setup.chief),
                       before_exit=run_lock.release_locks)


def _first_images(source, spec):
  """A training batch as the model sees it, for TensorBoard: the stream's
  first, so a resumed streamed dataset does not skip up to an epoch of raw
  records for it, and a small shuffle buffer, so it does not fill 10,000."""
  spec = dataclasses.replace(spec, shuffle_buffer=1, strict=False, data_service="")
  dataset = data.train_dataset_fn(source, source.train_split, spec)(
      tf.distribute.InputContext())
  return next(iter(dataset.take(1)))[0]
