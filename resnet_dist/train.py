"""A run, in the order it happens:

  run_setup.prepare()   every check that can fail cheaply: flags, data, model_dir
  Trainer(...)          model, optimizer and step, in the strategy's scope (trainer.py)
  resume()              the checkpoint to continue from, or the initial weights
  report_start()        what runs where, for how long, at what cost
  HostLoop.run()        the steps, and when to save, evaluate, profile and stop (host_loop.py)
  write_summary()       summary.json and the closing lines (summary.py)

run(config) calls them in that order; evaluation.evaluate(config, checkpoint)
reuses the first two. The Trainer owns the steps; the HostLoop owns everything
between loops of steps, so a recipe feature goes in one of the two: per-step
work (an EMA of the weights, gradient accumulation) in Trainer.replica_step,
what is saved in Trainer.checkpoint_state, what is evaluated in
evaluation.py, something done every so many steps (saving, evaluating, a
change of input size) as one of HostLoop.actions().
"""

import contextlib
import dataclasses
from typing import Optional

import tensorflow as tf

from resnet_dist import checkpoints, data, host_loop, models, monitor, optim, perf, run_lock
from resnet_dist import run_setup
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import Config
from resnet_dist.summary import finished_summary, write_summary
from resnet_dist.trainer import Trainer


def run(config: Config, strategy=None):
  """Trains (or resumes) a run; returns the summary written to model_dir/summary.json."""
  config.validate()
  setup = run_setup.prepare(config, strategy or run_setup.create_strategy(config))
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
    loop = host_loop.HostLoop(setup, trainer, resumed, cost)
    # The service's watch lasts to the end: the summary's input probe reads from it too.
    with host_loop.service_watch(setup) or contextlib.nullcontext() as loop.service_watch:
      return write_summary(setup, cost, loop.run())


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
              f"{trainer.learning_rate.value_at(step):.4g}, not {before:.4g})", setup.chief)
  if setup.chief:
    checkpoints.record_total_steps(setup.model_dir, setup.total_steps)
