"""Learning-rate schedules and the optimisers (momentum SGD, LARS, LAMB), with loss scaling.

Each is looked up by name in a table: SCHEDULES (--lr_schedule) and
OPTIMIZERS (--optimizer); another is a function or class here and an entry.
The first paragraph of each one's docstring is its line in the flag's help.
An optimizer builds itself from config.OptimConfig (Optimizer.of), so one
with a setting of its own (LARS's eta) reads it from its own field there.

The optimisers are small on purpose. The replica step all-reduces the
gradients itself, once; apply() then updates each replica's own copy of each
variable in replica context, with no further communication and no
merge_call, so the whole replica step can be one XLA computation (XLA on
GPUs under MirroredStrategy runs without merge_call). Their slot variables
are created at construction inside strategy.scope(), so nothing is built
lazily while a tf.function is being traced (Keras 3's optimizers fail there
under tf.distribute).

Both use TensorFlow's momentum form (learning rate inside the velocity):
    v <- momentum * v + lr * g ;  w <- w - v      (Nesterov: w <- w - (momentum * v + lr * g))
where g includes weight decay, weight_decay * w, for the variables it applies to.
Adding it to the all-reduced gradient gives N replicas exactly the single
device's update, with no scaling by the replica count.
"""

import math

import tensorflow as tf

from resnet_dist import models
from resnet_dist.errors import ConfigError

# LAMB's constants, timm's.
LAMB_BETAS = (0.9, 0.999)
LAMB_EPSILON = 1e-6
LAMB_MAX_GRAD_NORM = 1.0


def _warmed_up(step, schedule, lr):
  """lr after a linear warmup from 0 to the peak over the warmup steps."""
  if not schedule.warmup_steps:
    return lr
  return tf.where(step < schedule.warmup_steps, schedule.peak * step / schedule.warmup_steps, lr)


def piecewise(step, schedule):
  """x0.1 at each of --lr_boundary_epochs, after the warmup."""
  decay = tf.constant(1.0)
  for boundary in schedule.boundaries:
    decay = tf.where(step >= boundary, decay * 0.1, decay)
  return _warmed_up(step, schedule, schedule.peak * decay)


def cosine(step, schedule):
  """per step, from the peak at the end of warmup to 0 at the last step."""
  span = max(schedule.total_steps - schedule.warmup_steps, 1)
  progress = tf.clip_by_value((step - schedule.warmup_steps) / span, 0.0, 1.0)
  return _warmed_up(step, schedule, schedule.peak * 0.5 * (1.0 + tf.cos(math.pi * progress)))


def _epoch_warmup(epoch, schedule, decayed):
  """The per-epoch schedules' warmup: in epoch e < warmup the rate is
  warmup_learning_rate + e * (peak - warmup_learning_rate) / warmup; decayed after."""
  start, warmup = schedule.warmup_learning_rate, schedule.warmup_epochs
  if not warmup:
    return decayed
  return tf.where(epoch < warmup, start + epoch * (schedule.peak - start) / warmup, decayed)


def timm_cosine(step, schedule):
  """per epoch as timm's: warmup from --warmup_learning_rate, the cosine over all epochs.

  timm's CosineLRScheduler as its train.py runs it (per epoch, no warmup
  prefix): the rate changes once an epoch; after the warmup, the cosine of e
  over all the run's epochs, warmup included, down to 0 (timm's default --min-lr)."""
  epoch = tf.floor(step / schedule.steps_per_epoch)
  return _epoch_warmup(epoch, schedule, 0.5 * schedule.peak * (
      1.0 + tf.cos(math.pi * epoch / schedule.total_epochs)))


def torchvision_cosine(step, schedule):
  """per epoch as torchvision's: the same warmup, the cosine after it.

  torchvision's references/classification schedule: LinearLR warmup then
  CosineAnnealingLR (eta_min 0) in a SequentialLR, stepped once an epoch;
  the cosine runs over the epochs after the warmup, from the peak at its end.
  LinearLR's start_factor f is warmup_learning_rate = f * peak here."""
  epoch = tf.floor(step / schedule.steps_per_epoch)
  span = max(schedule.total_epochs - schedule.warmup_epochs, 1.0)
  progress = tf.clip_by_value((epoch - schedule.warmup_epochs) / span, 0.0, 1.0)
  return _epoch_warmup(epoch, schedule, 0.5 * schedule.peak * (1.0 + tf.cos(math.pi * progress)))


# The schedule table (--lr_schedule): name -> lr(step, LearningRate); step
# is a float32 tensor.
SCHEDULES = {"piecewise": piecewise, "cosine": cosine, "timm_cosine": timm_cosine,
             "torchvision_cosine": torchvision_cosine}


class LearningRate:
  """lr(step): a schedule of SCHEDULES, with its warmup. A function of the step.

  peak = base_learning_rate * global_batch_size / 256. boundary_epochs are
  piecewise's, warmup_learning_rate (absolute) the per-epoch ones'; every schedule
  ends at total_steps.
  """

  def __init__(self, base_learning_rate, global_batch_size, steps_per_epoch,
               total_steps, warmup_epochs=0.0, schedule="piecewise",
               boundary_epochs=(), warmup_learning_rate=0.0):
    if schedule not in SCHEDULES:
      raise ConfigError(f"unknown --lr_schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    self.peak = base_learning_rate * global_batch_size / 256.0
    self.steps_per_epoch = steps_per_epoch
    self.warmup_epochs = warmup_epochs
    self.warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    self.warmup_learning_rate = warmup_learning_rate
    self.total_steps = total_steps
    self.total_epochs = total_steps / steps_per_epoch
    self.schedule = SCHEDULES[schedule]
    self.boundaries = [int(round(e * steps_per_epoch)) for e in boundary_epochs]

  @classmethod
  def of(cls, options, global_batch_size, steps_per_epoch, total_steps):
    """The schedule a config.OptimConfig describes."""
    return cls(options.base_learning_rate, global_batch_size, steps_per_epoch, total_steps,
               warmup_epochs=options.warmup_epochs, schedule=options.lr_schedule,
               boundary_epochs=options.lr_boundary_epochs,
               warmup_learning_rate=options.warmup_learning_rate)

  def __call__(self, step):
    return self.schedule(tf.cast(step, tf.float32), self)

  def value_at(self, step):
    """The schedule as a Python float, for tests and logs."""
    return float(self(tf.constant(step)))


class Optimizer(tf.Module):
  """What every optimizer here shares: a fixed list of variables, which of
  them decay, the step count and a first slot per variable. apply() runs
  updates(grads, lr, apply), each subclass's own, and counts the step.

  decay_variables: the variables weight decay applies to (conv and dense
  kernels). LARS and LAMB also adapt only these; the others (BN parameters,
  biases) get the plain update, as in the MLPerf reference and timm. The
  attribute names (iterations, velocities, second_moments) are checkpoint keys.

  of(options, ...) builds one from a config.OptimConfig: settings(options)
  picks the keyword arguments of its class, so each reads its own fields.
  """

  def __init__(self, variables, decay_variables, weight_decay=0.0, name="optimizer"):
    super().__init__(name=name)
    self.weight_decay = weight_decay
    self.variables_ = [models.plain_variable(v) for v in variables]
    decay_ids = {id(models.plain_variable(v)) for v in decay_variables}
    self.decays = [id(v) in decay_ids for v in self.variables_]
    self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
    # SGD and LARS: the momentum buffer; LAMB: the first moment.
    self.velocities = self._slots("velocity")

  @classmethod
  def of(cls, options, variables, decay_variables):
    """This optimizer over variables, with the settings options (a config.OptimConfig) gives it."""
    return cls(variables, decay_variables, **cls.settings(options))

  @classmethod
  def settings(cls, options):
    """The keyword arguments of this class that options holds."""
    return {"weight_decay": options.weight_decay}

  def _slots(self, what):
    return [tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False,
                        name=v.name.split(":")[0].replace("/", "_") + "_" + what)
            for v in self.variables_]

  def apply(self, grads, lr, apply=None):
    """Applies all-reduced grads on every replica; call in replica context.

    Every variable here has aggregation NONE, so an assignment in replica
    context writes this replica's copy only; all replicas apply the same
    all-reduced gradients and so stay identical.

    apply: None, or a scalar bool tensor (False skips the step everywhere,
    e.g. a non-finite fp16 gradient), identical on all replicas because it is
    computed from all-reduced values.
    """
    with tf.control_dependencies(self.updates(grads, lr, apply)):
      return self.iterations.assign_add(1)


class Momentum(Optimizer):
  """momentum SGD, optionally Nesterov."""

  def __init__(self, variables, decay_variables, *, momentum, nesterov=False, **options):
    super().__init__(variables, decay_variables, **options)
    self.momentum = momentum
    self.nesterov = nesterov

  @classmethod
  def settings(cls, options):
    return {**super().settings(options), "momentum": options.momentum,
            "nesterov": options.nesterov}

  def scaled_lr(self, variable, grad, lr):
    del variable, grad
    return lr

  def updates(self, grads, lr, apply):
    return [self._update(variable, velocity, grad, lr, decays, apply)
            for variable, velocity, grad, decays in zip(
                self.variables_, self.velocities, grads, self.decays)]

  def _update(self, variable, velocity, grad, lr, decays, apply):
    """One variable, on one device. apply: a bool tensor; False leaves all state as is."""
    if decays and self.weight_decay:
      grad = grad + self.weight_decay * variable
    scaled_lr = self.scaled_lr(variable, grad, lr) if decays else lr
    new_velocity = self.momentum * velocity + scaled_lr * grad
    step = self.momentum * new_velocity + scaled_lr * grad if self.nesterov else new_velocity
    if apply is not None:
      new_velocity = tf.where(apply, new_velocity, velocity)
      step = tf.where(apply, step, tf.zeros_like(step))
    return tf.group(velocity.assign(new_velocity), variable.assign_sub(step))


class Lars(Momentum):
  """LARS (You et al. 2017), for large batches: momentum SGD with a layer-wise
  trust ratio on the decayed variables, --lars_eta * |w| / |g|."""

  def __init__(self, variables, decay_variables, *, lars_eta, **options):
    super().__init__(variables, decay_variables, **options)
    self.lars_eta = lars_eta

  @classmethod
  def settings(cls, options):
    return {**super().settings(options), "lars_eta": options.lars_eta}

  def scaled_lr(self, variable, grad, lr):
    w_norm, g_norm = tf.norm(variable), tf.norm(grad)
    return lr * tf.where((w_norm > 0) & (g_norm > 0), self.lars_eta * w_norm / g_norm, 1.0)


class Lamb(Optimizer):
  """timm's LAMB (You et al. 2019), as "ResNet strikes back" trains: Adam's
  moments, gradients clipped to norm 1, a trust ratio on decayed kernels;
  ignores --momentum and --nesterov.

  As timm's Lamb: the moments bias-corrected, the clipping to a global norm
  before anything else, the decay and the trust ratio on the variables that
  decay only."""

  def __init__(self, variables, decay_variables, **options):
    super().__init__(variables, decay_variables, **options)
    self.second_moments = self._slots("second_moment")

  def updates(self, grads, lr, apply):
    norm = tf.linalg.global_norm(grads)
    clip = tf.where(norm > LAMB_MAX_GRAD_NORM, norm / LAMB_MAX_GRAD_NORM, 1.0)
    t = tf.cast(self.iterations + 1, tf.float32)
    return [self._update(variable, first, second, grad / clip, lr, decays, apply, t)
            for variable, first, second, grad, decays in zip(
                self.variables_, self.velocities, self.second_moments, grads, self.decays)]

  def _update(self, variable, first, second, grad, lr, decays, apply, t):
    """LAMB on one variable; t: the 1-based step, for the bias corrections."""
    beta1, beta2 = LAMB_BETAS
    new_first = beta1 * first + (1 - beta1) * grad
    new_second = beta2 * second + (1 - beta2) * tf.square(grad)
    denominator = tf.sqrt(new_second) / tf.sqrt(1 - beta2**t) + LAMB_EPSILON
    update = new_first / (1 - beta1**t) / denominator
    if decays and self.weight_decay:
      update += self.weight_decay * variable
      w_norm, u_norm = tf.norm(variable), tf.norm(update)
      update *= tf.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
    step = lr * update
    if apply is not None:
      new_first = tf.where(apply, new_first, first)
      new_second = tf.where(apply, new_second, second)
      step = tf.where(apply, step, tf.zeros_like(step))
    return tf.group(first.assign(new_first), second.assign(new_second),
                    variable.assign_sub(step))


# The optimizer table (--optimizer): name -> an Optimizer class, built by
# its of(config.OptimConfig, variables, decay_variables).
OPTIMIZERS = {"sgd": Momentum, "lars": Lars, "lamb": Lamb}


def create_optimizer(options, variables, decay_variables):
  """The OPTIMIZERS entry options.optimizer names (options: a
  config.OptimConfig) over variables, with its own settings from options."""
  if options.optimizer not in OPTIMIZERS:
    raise ConfigError(f"unknown --optimizer {options.optimizer!r}; choose from "
                      f"{', '.join(OPTIMIZERS)}")
  return OPTIMIZERS[options.optimizer].of(options, variables, decay_variables)


class DynamicLossScale(tf.Module):
  """fp16 loss scaling: halve and skip on non-finite gradients, double after
  growth_interval finite steps in a row (the usual 2**15 start, 2000 steps)."""

  def __init__(self, initial=2.0**15, growth_interval=2000):
    super().__init__(name="loss_scale")
    self.growth_interval = growth_interval
    self.scale = tf.Variable(initial, dtype=tf.float32, trainable=False, name="scale")
    self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="good_steps")

  def update(self, finite):
    """Call in replica context with the same `finite` on every replica: each
    replica then updates its own copy (aggregation NONE) to the same value."""
    grow = finite & (self.good_steps + 1 >= self.growth_interval)
    new_scale = tf.where(finite, tf.where(grow, self.scale * 2.0, self.scale),
                         tf.maximum(self.scale * 0.5, 1.0))
    new_good = tf.where(finite & ~grow, self.good_steps + 1, tf.zeros_like(self.good_steps))
    return tf.group(self.scale.assign(new_scale), self.good_steps.assign(new_good))
