"""Every flag, defined once, grouped as the path of a batch: model, data,
distribution, training, checkpointing, monitoring.

The command line is flat; each flag sets the field of its name in one part
of resnet_dist.config.Config (config.flag_field says which), and
config_from_flags() builds the Config from all of them, so no flag goes
unread.
"""

from absl import flags

from resnet_dist import data, losses, models, optim, preemption
from resnet_dist.data import augment, mixing, preprocess
from resnet_dist import cluster as cluster_lib
from resnet_dist import strategy as strategy_lib
from resnet_dist import collectives
from resnet_dist import config as config_lib
from resnet_dist.config import DTYPES, Config


def _default(name):
  part, field = config_lib.flag_field(name)
  return getattr(getattr(Config(), part), field)



# Model
flags.DEFINE_enum("model", _default("model"), models.list_models(), "The ResNet to train.")
flags.DEFINE_enum("resnet_variant", _default("resnet_variant"), models.VARIANTS,
                  "ImageNet ResNets: v1.5 (stride on the 3x3 conv), v1 (stride on "
                  "the first 1x1), d (ResNet-D). CIFAR ResNets ignore it.")
flags.DEFINE_integer("image_size", _default("image_size"), "Input height and width (>= 32).",
                     lower_bound=32)
flags.DEFINE_bool("zero_init_residual", _default("zero_init_residual"),
                  "Start the last BN gamma of each residual block at zero.")
flags.DEFINE_float("drop_path_rate", _default("drop_path_rate"),
                   "Stochastic depth: in training, drop each example's residual branch of "
                   "the last block with this probability, of earlier blocks less, in "
                   "proportion to their place (timm's rule; RSB A1/A2: 0.05); 0: off.",
                   lower_bound=0, upper_bound=0.99)
flags.DEFINE_bool("sync_bn", _default("sync_bn"),
                  "BatchNorm statistics over the global batch (all replicas).")

# Data
flags.DEFINE_string("dataset", _default("dataset"), data.DATASETS_HELP + ".")
flags.DEFINE_string("data_dir", _default("data_dir"),
                    "Where datasets live (local or gs://): ImageNet's TFRecords, or TFDS's "
                    "directory (empty: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_bool("download", _default("download"),
                  "Allow TFDS to download and prepare a missing dataset.")
flags.DEFINE_integer("num_classes", _default("num_classes"),
                     "Classes of --dataset=synthetic or imagenet (the others know theirs).",
                     lower_bound=2)
flags.DEFINE_integer("shuffle_buffer", _default("shuffle_buffer"),
                     "Records in each input pipeline's shuffle buffer (TFRecord datasets).",
                     lower_bound=1)
flags.DEFINE_bool("cache_data", _default("cache_data"),
                  "Read a TFRecord dataset into memory once at start (each worker holds all of "
                  "it): a fresh permutation every epoch and the same global batches on "
                  "any number of replicas.")
flags.DEFINE_bool("strict_data", _default("strict_data"),
                  "Stop at the first undecodable image, naming its file, instead of "
                  "skipping and counting it.")

flags.DEFINE_string("data_service", _default("data_service"),
                    "HOST:PORT of a tf.data service dispatcher (python -m launch.data_service): "
                    "its workers read, decode, augment and batch the training input. "
                    "Evaluation stays local.")
flags.DEFINE_integer("data_service_timeout_seconds", _default("data_service_timeout_seconds"),
                     "How long a run waits for the service's dispatcher at start, and how "
                     "long one that stops answering (or loses every worker) mid-run, "
                     "before it stops.", lower_bound=1)

# Distribution
flags.DEFINE_enum("strategy", _default("strategy"), strategy_lib.STRATEGIES,
                  "auto: multi_worker_mirrored where TF_CONFIG names several tasks, else a "
                  "TPU if --tpu names one or one is attached, else mirrored over GPUs, else "
                  "over --num_cpu_devices logical CPU devices.")
flags.DEFINE_integer("num_gpus", _default("num_gpus"),
                     "GPUs for mirrored; default all visible.", lower_bound=0)
flags.DEFINE_integer("num_cpu_devices", _default("num_cpu_devices"),
                     "Logical CPU devices for mirrored when there is no GPU.", lower_bound=1)
flags.DEFINE_string("tpu", _default("tpu"),
                    "local (a single-host TPU VM), a Cloud TPU name (a pod slice, from its "
                    "worker 0; a TPU node), or grpc://HOST:PORT. Default: $TPU_NAME.")
flags.DEFINE_string("tpu_zone", _default("tpu_zone"), "Zone of a named Cloud TPU.")
flags.DEFINE_string("gcp_project", _default("gcp_project"), "Project of a named Cloud TPU.")
flags.DEFINE_integer("collective_timeout_seconds", _default("collective_timeout_seconds"),
                     "multi_worker_mirrored, for debugging: a collective that waits longer "
                     "fails the run. Each collective then holds a thread for this long; "
                     "0: off (a dead peer is found by heartbeats).", lower_bound=0)
flags.DEFINE_enum("cluster", _default("cluster"), cluster_lib.SOURCES,
                  "Where the cluster of a multi-worker run is read: auto (TF_CONFIG if set, "
                  "else an srun job step, else a pod of an Indexed Job), "
                  "tf_config, slurm or kubernetes.")
flags.DEFINE_integer("cluster_port", _default("cluster_port"),
                     "SLURM: the port of each node's first task (the next tasks take the next "
                     "ports); 0: one derived from the job ID.", lower_bound=0)
flags.DEFINE_enum("all_reduce", _default("all_reduce"), collectives.ALL_REDUCE,
                  "The gradients' collective between replicas: auto (NCCL between GPUs, "
                  "within and across hosts; ring between CPUs), nccl or ring.")
flags.DEFINE_float("all_reduce_pack_mb", _default("all_reduce_pack_mb"),
                   "The gradients cross in packs of at least this many MB, the last "
                   "layers' first, so a pack can cross while the backward pass goes on; "
                   "0: one pack.", lower_bound=0)
flags.DEFINE_enum("all_reduce_dtype", _default("all_reduce_dtype"),
                  tuple(collectives.ALL_REDUCE_DTYPES),
                  "The gradients' dtype on the wire (fp16, bf16: half the bytes); the "
                  "update reads them back as float32.")
flags.DEFINE_enum("gpu_thread_mode", _default("gpu_thread_mode"), strategy_lib.GPU_THREAD_MODES,
                  "gpu_private: each GPU gets 2 threads of its own to launch its kernels "
                  "(TF_GPU_THREAD_MODE, set before TensorFlow creates the GPUs; one you set "
                  "wins); global: TensorFlow's one shared pool.")

# Training
flags.DEFINE_integer("global_batch_size", _default("global_batch_size"),
                     "Examples per step over all replicas.", lower_bound=1)
flags.DEFINE_float("train_epochs", _default("train_epochs"), "Epochs to train.", lower_bound=0)
flags.DEFINE_integer("train_steps", _default("train_steps"),
                     "Steps to train; > 0 overrides --train_epochs.", lower_bound=0)
flags.DEFINE_integer("steps_per_loop", _default("steps_per_loop"),
                     "Steps run inside one tf.function call.", lower_bound=1)
flags.DEFINE_integer("stop_check_steps", _default("stop_check_steps"),
                     "Steps run back to back, no step waiting for the one before to reach "
                     "the host; a stop (a signal to any worker) takes effect within this many.",
                     lower_bound=1)
flags.DEFINE_float("epochs_between_evals", _default("epochs_between_evals"),
                   "Evaluate every this many epochs; 0: at the end only.", lower_bound=0)
flags.DEFINE_bool("skip_eval", _default("skip_eval"), "Never evaluate.")
flags.DEFINE_enum("dtype", _default("dtype"), list(DTYPES),
                  "fp32; bf16 (mixed_bfloat16); fp16 (mixed_float16, dynamic loss scaling).")
flags.DEFINE_bool("enable_xla", _default("enable_xla"),
                  "Compile with XLA: the whole replica step on one device and on TPUs; "
                  "forward and backward over several GPUs, the all-reduce and update "
                  "outside (docs/distributed.md).")
flags.DEFINE_enum("optimizer", _default("optimizer"), list(optim.OPTIMIZERS),
                  "sgd (momentum), lars (large batches) or lamb (timm's: Adam moments, "
                  "gradients clipped to norm 1, trust ratio on decayed kernels; ignores "
                  "--momentum).")
flags.DEFINE_enum("loss", _default("loss"), list(losses.LOSSES),
                  "softmax cross-entropy, or bce: a sigmoid per class, averaged over the "
                  "classes (timm's, as in ResNet strikes back). Evaluation reports softmax "
                  "cross-entropy either way.")
flags.DEFINE_float("base_learning_rate", _default("base_learning_rate"),
                   "Learning rate per 256 examples; scaled by global_batch_size / 256.")
flags.DEFINE_enum("lr_schedule", _default("lr_schedule"), list(optim.SCHEDULES),
                  "piecewise (x0.1 at --lr_boundary_epochs), cosine (per step, from the end "
                  "of warmup), timm_cosine (timm's: per epoch, warmup from "
                  "--warmup_learning_rate, the cosine over all epochs) or torchvision_cosine "
                  "(torchvision's: per epoch, the same warmup, the cosine after it).")
flags.DEFINE_list("lr_boundary_epochs", [f"{e:g}" for e in _default("lr_boundary_epochs")],
                  "piecewise: epochs at which the learning rate drops x0.1.")
flags.DEFINE_float("warmup_epochs", _default("warmup_epochs"), "Linear warmup length.",
                   lower_bound=0)
flags.DEFINE_float("warmup_learning_rate", _default("warmup_learning_rate"),
                   "timm_cosine, torchvision_cosine: the learning rate of the first epoch, "
                   "absolute (timm's --warmup-lr; torchvision's --lr-warmup-decay times the "
                   "peak).", lower_bound=0)
flags.DEFINE_float("momentum", _default("momentum"), "Momentum.", lower_bound=0)
flags.DEFINE_bool("nesterov", _default("nesterov"), "Nesterov momentum.")
flags.DEFINE_float("weight_decay", _default("weight_decay"),
                   "L2 decay of conv and dense kernels.", lower_bound=0)
flags.DEFINE_float("label_smoothing", _default("label_smoothing"), "Label smoothing.",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_float("bce_target_threshold", _default("bce_target_threshold"),
                   "--loss=bce: each class's target (smoothed, mixed) becomes 1 above this "
                   "and 0 elsewhere, as timm's --bce-target-thresh (RSB: 0.2); 0: off.",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_integer("seed", _default("seed"),
                     "Seed of initialisation, data order and augmentation.")
flags.DEFINE_bool("deterministic", _default("deterministic"),
                  "Deterministic kernels and training input in order: bit-identical reruns "
                  "and resumes, the same batches on any strategy; slower. Without it a slow "
                  "image holds up nothing and each example keeps its augmentation.")
flags.DEFINE_integer("progress_timeout_seconds", _default("progress_timeout_seconds"),
                     "A run whose steps, saves or evaluations make no progress for this "
                     "long (a stuck peer, a read that never returns) ends with one line and "
                     "status 70, for its launcher to restart it; longer than your slowest "
                     "evaluation or save. 0: never.", lower_bound=0)

# Recipe: each is off by default (docs/recipes.md)
flags.DEFINE_float("ema_decay", _default("ema_decay"),
                   "Keep an exponential moving average of the weights and BN statistics, "
                   "with this decay per step (0: none); evaluated beside the weights.",
                   lower_bound=0, upper_bound=1)
flags.DEFINE_integer("ema_every_steps", _default("ema_every_steps"),
                     "Update the EMA every this many steps, by ema_decay**K.", lower_bound=1)
flags.DEFINE_float("mixup_alpha", _default("mixup_alpha"),
                   "Mixup: blend each image with another, lambda ~ Beta(A, A); 0: off.",
                   lower_bound=0)
flags.DEFINE_float("cutmix_alpha", _default("cutmix_alpha"),
                   "CutMix: paste a box of another image, area ~ Beta(B, B); 0: off. With "
                   "mixup too, each batch gets one of the two.", lower_bound=0)
flags.DEFINE_string("augment", _default("augment"),
                    "Automatic augmentation after the crop and flip: "
                    f"{', '.join(augment.POLICIES)} (torchvision's), or timm's RandAugment by "
                    "its spec string, such as rand-m6-mstd0.5-inc1 (docs/recipes.md).")
flags.DEFINE_integer("randaugment_num_ops", _default("randaugment_num_ops"),
                     "randaugment: ops applied to each image.", lower_bound=1)
flags.DEFINE_integer("randaugment_magnitude", _default("randaugment_magnitude"),
                     f"randaugment: the magnitude bin of every op, 0..{augment.BINS - 1}.",
                     lower_bound=0, upper_bound=augment.BINS - 1)
flags.DEFINE_float("random_erasing", _default("random_erasing"),
                   "Probability of erasing a random box of each image (after normalising), "
                   "filled as --random_erasing_fill says.", lower_bound=0, upper_bound=1)
flags.DEFINE_enum("random_erasing_fill", _default("random_erasing_fill"),
                  list(mixing.ERASING_FILLS), "What an erased box holds: noise, N(0, 1) per "
                  "pixel (timm's); zero, the mean colour (torchvision's presets).")
flags.DEFINE_integer("repeated_augmentations", _default("repeated_augmentations"),
                     "Repeated augmentation, as torchvision's RASampler: each epoch takes a "
                     "random N-th of the training examples, each N times, augmented apart, "
                     "on N replicas; the epoch keeps its length; 1: off.", lower_bound=1)
flags.DEFINE_enum("crop", _default("crop"), ["", *preprocess.CROPS],
                  "Training's crop; empty: the dataset's (inception above 64 pixels, "
                  "pad_crop_flip at 64 or less). inception: MLPerf's and Model Garden's "
                  "sampler (at least 10% of the image covered); random_resized: "
                  "torchvision's RandomResizedCrop, which timm uses too.")
flags.DEFINE_enum("interpolation", _default("interpolation"), list(preprocess.INTERPOLATIONS),
                  "How every resize samples, in training and evaluation, and the geometric "
                  "ops of --augment (nearest, or else bilinear). random: each training crop "
                  "bilinear or bicubic at even odds, every other resize bicubic (timm's).")
flags.DEFINE_bool("antialias", _default("antialias"),
                  "Antialias every shrink, as PIL and torchvision do (their recipes and "
                  "weights expect it); it costs about as much input CPU as decoding.")
flags.DEFINE_integer("eval_image_size", _default("eval_image_size"),
                     "Evaluation image size; 0: --image_size.", lower_bound=0)
flags.DEFINE_integer("eval_resize_size", _default("eval_resize_size"),
                     "ImageNet-style evaluation as torchvision and timm: the shorter side "
                     "resized to this, then the central eval_image_size (232 with 224: "
                     "torchvision's); 0: the central 87.5%, then resized (MLPerf's).",
                     lower_bound=0)
flags.DEFINE_string("progressive_resize", "",
                    "START:END:FROM_EPOCH:TO_EPOCH: training images grow from START to END "
                    "pixels, in steps of 32, between the two epochs (FFCV's ramp).")
flags.DEFINE_integer("grad_accum_steps", _default("grad_accum_steps"),
                     "Micro-batches per update: each step's batch is split into this many "
                     "forward and backward passes.", lower_bound=1)

# Checkpointing
flags.DEFINE_string("model_dir", _default("model_dir"),
                    "Checkpoints, summaries and summary.json; an existing run resumes. "
                    "Empty: runs/MODEL-DATASET-TIMESTAMP.")
flags.DEFINE_string("init_checkpoint", _default("init_checkpoint"),
                    "Start from another run's weights (its model_dir or a checkpoint); the "
                    "classifier starts fresh when the number of classes differs. Ignored "
                    "when model_dir has a checkpoint to resume.")
flags.DEFINE_integer("checkpoint_every_steps", _default("checkpoint_every_steps"),
                     "Save every this many steps (also at evaluations and at the end); "
                     "0: once an epoch.", lower_bound=0)
flags.DEFINE_bool("start_over", _default("start_over"),
                  "Train from step 0 even though model_dir has checkpoints, deleting them.")
flags.DEFINE_integer("keep_checkpoints", _default("keep_checkpoints"),
                     "Checkpoints kept.", lower_bound=1)
flags.DEFINE_string("gce_metadata", _default("gce_metadata"),
                    "The GCE metadata server's computeMetadata/v1 URL (on GCE and TPU VMs: "
                    f"{preemption.METADATA_URL}): a preemption or "
                    "maintenance notice there, or a host's in model_dir/notices, stops the "
                    "run after a step, saved (exit 75). Empty: not watched.")

# Monitoring
flags.DEFINE_integer("log_every_steps", _default("log_every_steps"),
                     "Print a progress line every this many steps.", lower_bound=1)
flags.DEFINE_string("profile_steps", "",
                    "START,END: trace steps START to END-1 with tf.profiler into "
                    "model_dir/plugins/profile (TensorBoard's Profile tab).")
flags.DEFINE_float("peak_tflops", _default("peak_tflops"),
                   "Peak TFLOP/s of all replicas together, for the FLOP utilisation "
                   "summary; 0: measure a matmul on the replicas at start.", lower_bound=0)


def _epochs(values):
  """["30", "60"] -> (30.0, 60.0); None when one is not a number."""
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    return None


def _step_range(value):
  """"START,END" -> (START, END); "" -> None; False when malformed."""
  if not value:
    return None
  try:
    start, end = (int(v) for v in value.split(","))
  except ValueError:
    return False
  return start, end


def _ramp(value):
  """"START:END:FROM:TO" -> (START, END, FROM, TO); "" -> None; False when malformed."""
  if not value:
    return None
  parts = value.split(":")
  try:
    start, end, first, last = parts
    return int(start), int(end), float(first), float(last)
  except ValueError:
    return False


flags.register_validator("dataset", data.is_dataset_name,
                         message="--dataset must be " + data.DATASETS_HELP)
flags.register_validator("lr_boundary_epochs", lambda v: _epochs(v) is not None,
                         message="--lr_boundary_epochs must be numbers, as 30,60,80")
flags.register_validator("profile_steps", lambda v: _step_range(v) is not False,
                         message="--profile_steps must be START,END, as 10,15")
flags.register_validator("progressive_resize", lambda v: _ramp(v) is not False,
                         message="--progressive_resize must be START:END:FROM_EPOCH:TO_EPOCH, "
                                 "as 160:192:0:70")

FLAGS = flags.FLAGS


def config_from_flags(**overrides):
  """The Config the parsed flags describe (the flags' values converted once),
  with `overrides` for fields whose flag the user did not give."""
  values = {name: FLAGS[name].value for name in config_lib.flag_names()}
  values["lr_boundary_epochs"] = _epochs(values["lr_boundary_epochs"])
  values["profile_steps"] = _step_range(values["profile_steps"])
  values["progressive_resize"] = _ramp(values["progressive_resize"])
  values.update({k: v for k, v in overrides.items() if not FLAGS[k].present})
  return Config.from_flat(**values)
