"""Every random stream of training, named: the one place its seed offset is chosen.

Every random draw is stateless: its values are a function of its seed, an
int64 pair, alone. A stream's seed is a base plus its offset below (added to
both words, as a tensor plus an int adds), and the draws within a stream sit
at offsets of their own from the stream's seed.

Never change a value here, nor split two streams that share one or join two
that differ. A resumed run replays its examples' crops and augmentations and
its steps' erasing and mixing only because each draw's seed is what it was
before the stop; a checkpoint written before such a change would resume on
other draws, and an old run would no longer reproduce from its --seed. A new
stream takes a value no stream below uses.
"""

# --- The input pipeline ---------------------------------------------------------
# An example's seed is [--seed + EXAMPLE, its key]; the key is its place in the
# global order, or its record's slot and index (pipeline.py), so the example
# is cropped and augmented alike whichever pipeline or restart reads it.
EXAMPLE = 0x5EED
# Offsets from an example's seed:
CROP = 0           # the crop's window (preprocess.py)
FLIP = 1           # the horizontal flip
RESIZE = 2         # --interpolation=random: bilinear or bicubic
POLICY = 8         # the --augment policy; its draws at offsets from here, below

# The orders of an epoch (pipeline.py), [--seed + ORDER, epoch]: of the
# examples (indexed data), or of a pipeline's files. A pipeline's shuffle
# buffer of records draws its seed from [--seed + ORDER, epoch *
# RECORD_EPOCH_STRIDE + pipeline], so each pipeline of each epoch shuffles its
# own way (while there are fewer pipelines than the stride); under a tf.data
# service, whose workers keep no epochs, the buffer's seed is --seed + ORDER.
ORDER = 0
RECORD_EPOCH_STRIDE = 1000003

# --- The policies' draws, offsets from the policy's seed (augment.py) ------------
# trivialaugment_wide: the op, its magnitude bin, its sign.
TRIVIAL_OP, TRIVIAL_LEVEL, TRIVIAL_SIGN = 0, 1, 2
# randaugment: op i draws at RANDAUGMENT_STRIDE * i plus these.
RANDAUGMENT_STRIDE = 3
RANDAUGMENT_OP, RANDAUGMENT_SIGN = 0, 1
# autoaugment: the sub-policy, whether each of its two ops applies, and op i's
# sign at AUTOAUGMENT_SIGN + i.
AUTOAUGMENT_SUB_POLICY, AUTOAUGMENT_APPLIES, AUTOAUGMENT_SIGN = 0, 1, 2
# timm's RandAugment (timm_augment.py): op i draws at TIMM_STRIDE * i plus
# these; TIMM_APPLIES draws two values: whether the op applies, and its sign.
TIMM_STRIDE = 4
TIMM_OP, TIMM_APPLIES, TIMM_MAGNITUDE = 0, 1, 2

# --- The replica step -----------------------------------------------------------
# A step's seed is [--seed + salt, counter], the counter unique to the step,
# micro-batch and replica (trainer.py), one salt per stream:
ERASING = 0xE4A5E
MIXING = 0x313C5
DROP_PATH = 0xD4095    # --drop_path_rate's, folded with each block's index (models)

# Random erasing's draws (mixing.py), from ERASING's seed: whether each image
# is erased, the boxes' areas, their aspect ratios, their places, the noise.
ERASE_WHETHER, ERASE_AREA, ERASE_ASPECT, ERASE_PLACE, ERASE_NOISE = 0, 1, 2, 3, 4
# Mixing's, from MIXING's seed: mixup or CutMix (with both alphas), mixup's
# lambda, CutMix's box. With both alphas both are drawn every step, and their
# seeds overlap (mixup's lambda draws from MIXUP to MIXUP + 5, CutMix's box
# from CUTMIX to CUTMIX + 6): harmless, as a step applies one of the two.
MIX_WHICH, MIXUP, CUTMIX = 0, 1, 2
# CutMix's box: its centre, then its lambda.
CUTMIX_CENTRE, CUTMIX_LAMBDA = 0, 1
# A Beta(alpha, alpha) draw: two Gamma draws, each taking three seeds.
BETA_FIRST, BETA_SECOND = 0, 3
# A Gamma draw: the proposals, their acceptance draws, alpha < 1's boost.
GAMMA_PROPOSALS, GAMMA_ACCEPT, GAMMA_BOOST = 0, 1, 2
