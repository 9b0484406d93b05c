"""Settings: each defined once, by its field, and its flag and its check
read from there; the flags' names; the checks' errors; run.json's layout."""

import dataclasses
import sys
import typing

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
from absl import flags
from absl.testing import absltest, flagsaver

from flags import definitions
from resnet_dist import config as config_lib
from resnet_dist.config import Config, settings
from resnet_dist.errors import ConfigError

FLAGS = flags.FLAGS


def _fields():
  """(part name, dataclasses.Field) of every setting."""
  return [(part.name, field) for part in dataclasses.fields(Config)
          for field in dataclasses.fields(part.type)]


def _default(part, field):
  return getattr(getattr(Config(), part), field.name)


class NamesTest(absltest.TestCase):

  def test_field_and_flag_names_are_unique_across_the_parts(self):
    fields = [field.name for _, field in _fields()]
    self.assertCountEqual(fields, set(fields))
    names = [settings.flag_name(field) for _, field in _fields()]
    self.assertCountEqual(names, set(names))

  def test_every_flag_names_exactly_one_field_and_every_field_has_a_flag(self):
    self.assertLen(config_lib.flag_names(), len(_fields()))
    for part, field in _fields():
      self.assertEqual(config_lib.flag_field(settings.flag_name(field)), (part, field.name))
    self.assertEqual(config_lib.flag_field("model"), ("model", "name"))
    self.assertEqual(config_lib.flag_field("augment"), ("augment", "policy"))
    defined = {flag.name for flag in FLAGS.get_flags_for_module(definitions)}
    self.assertEqual(defined, set(config_lib.flag_names()))
    with self.assertRaisesRegex(TypeError, "no part of Config has a setting 'name'"):
      Config.from_flat(name="resnet50")

  def test_the_settings_are_read_without_the_strategy_module(self):
    # strategy.py sets TensorFlow up as it loads; reading flags must not.
    self.assertNotIn("resnet_dist.strategy", sys.modules)


class FlagsTest(absltest.TestCase):
  """Each flag as its field says: default, help, choices, bounds."""

  def test_each_flag_has_its_fields_default_help_choices_and_bounds(self):
    for part, field in _fields():
      setting, flag = settings.of(field), FLAGS[settings.flag_name(field)]
      self.assertTrue(flag.help.endswith(setting.flag_help()), flag.name)  # enums: after <a|b>
      if typing.get_origin(settings.value_type(field)) is not tuple:  # text: below
        self.assertEqual(flag.default, _default(part, field), flag.name)
      if setting.choices is not None:
        self.assertEqual(flag.parser.enum_values,
                         [""] * setting.blank + list(setting.choices), flag.name)
      self.assertEqual(getattr(flag.parser, "lower_bound", None), setting.at_least, flag.name)
      self.assertEqual(getattr(flag.parser, "upper_bound", None), setting.at_most, flag.name)
    self.assertEqual(definitions.config_from_flags(), Config())

  def test_a_bound_the_parser_cannot_state_is_in_the_help_and_checked(self):
    self.assertEqual(FLAGS["drop_path_rate"].parser.lower_bound, 0)
    self.assertIsNone(FLAGS["drop_path_rate"].parser.upper_bound)
    self.assertTrue(FLAGS["drop_path_rate"].help.endswith("Must be in [0, 1)."))
    Config.from_flat(drop_path_rate=0.995).validate()  # the flag's 0.99 no longer caps it
    with self.assertRaisesRegex(ConfigError, r"^--drop_path_rate=1.0 must be in \[0, 1\)$"):
      Config.from_flat(drop_path_rate=1.0).validate()

  def test_the_optimizers_help_comes_from_their_table(self):
    text = FLAGS["optimizer"].help
    for name in ("sgd:", "lars:", "lamb:", "--lars_eta", "ignores --momentum"):
      self.assertIn(name, text)

  def test_text_flags_parse_as_their_fields_hold(self):
    with flagsaver.flagsaver():
      FLAGS(["test", "--lr_boundary_epochs=10,20.5", "--profile_steps=3,5",
             "--progressive_resize=160:192:0:70", "--model=resnet50", "--augment=randaugment",
             "--lars_eta=0.002"])
      config = definitions.config_from_flags(model="resnet18", seed=7)
    self.assertEqual(config.optim.lr_boundary_epochs, (10.0, 20.5))
    self.assertEqual(config.monitor.profile_steps, (3, 5))
    self.assertEqual(config.data.progressive_resize, (160, 192, 0.0, 70.0))
    self.assertEqual(config.model.name, "resnet50")  # given: the override yields
    self.assertEqual(config.execution.seed, 7)
    self.assertEqual(config.augment.policy, "randaugment")
    self.assertEqual(config.optim.lars_eta, 0.002)
    for bad, message in (("--profile_steps=3", "--profile_steps must be START,END, as 10,15"),
                         ("--lr_boundary_epochs=a", "--lr_boundary_epochs must be numbers"),
                         ("--progressive_resize=1:2", "--progressive_resize must be START:END")):
      with flagsaver.flagsaver(), self.assertRaisesRegex(flags.IllegalFlagValueError, message):
        FLAGS(["test", bad])


class ValidateTest(absltest.TestCase):

  def test_bounds_and_choices_are_checked_from_the_fields(self):
    for changes, message in (
        ({"drop_path_rate": -0.1}, r"--drop_path_rate=-0.1 must be in \[0, 1\)"),
        ({"image_size": 16}, "--image_size=16 is below the minimum of 32"),
        ({"eval_image_size": 16}, "--eval_image_size=16 is below the minimum of 32"),
        ({"repeated_augmentations": 0}, "--repeated_augmentations=0 must be >= 1"),
        ({"mixup_alpha": -1.0}, "--mixup_alpha and --cutmix_alpha must be >= 0"),
        ({"random_erasing": 1.5}, "--random_erasing=1.5 must be a probability"),
        ({"randaugment_magnitude": 31},
         r"--randaugment_num_ops must be >= 1 and --randaugment_magnitude in 0\.\.30"),
        ({"base_learning_rate": 0.0}, "--base_learning_rate=0.0 must be a positive number"),
        ({"ema_decay": 1.0}, r"--ema_decay=1.0 must be in \[0, 1\)"),
        ({"global_batch_size": 0}, "--global_batch_size must be positive"),
        ({"steps_per_loop": 0}, "--steps_per_loop must be at least 1"),
        ({"progress_timeout_seconds": -1}, r"--progress_timeout_seconds must be 0 \(off\) or more"),
        ({"all_reduce_pack_mb": -1.0}, r"--all_reduce_pack_mb must be 0 \(one pack\) or more"),
        ({"label_smoothing": 2.0}, r"--label_smoothing=2.0 must be in \[0, 1\]"),
        ({"num_classes": 1}, "--num_classes must be at least 2"),
        ({"momentum": float("inf")}, "--momentum=inf is not a finite number"),
        ({"crop": "square"}, "unknown --crop=square; choose from inception, random_resized,"),
        ({"dtype": "fp8"}, "unknown --dtype=fp8; choose from fp32, bf16, fp16"),
        ({"all_reduce_dtype": "fp8"}, "unknown --all_reduce_dtype=fp8; choose from fp32, fp16,"),
        ({"strategy": "mesh"}, "unknown --strategy=mesh; choose from auto, one_device,")):
      with self.assertRaisesRegex(ConfigError, "^" + message):
        Config.from_flat(**changes).validate()
    Config.from_flat(crop="", label_smoothing=1.0, num_gpus=None, random_erasing=1.0).validate()

  def test_each_bound_is_checked_at_its_edge(self):
    for part, field in _fields():
      setting = settings.of(field)
      name = settings.flag_name(field)
      for edge, inside in ((setting.at_least, True), (setting.above, False),
                           (setting.at_most, True), (setting.below, False)):
        if edge is None:
          continue
        self.assertEqual(setting.holds(edge), inside, name)
        with self.assertRaisesRegex(ConfigError, f"--{name}", msg=name):
          settings.check(dataclasses.replace(
              getattr(Config(), part), **{field.name: edge + (-1 if edge in (
                  setting.at_least, setting.above) else 1)}))


class RecordTest(absltest.TestCase):

  def test_run_json_records_the_parts_as_it_always_has(self):
    record = Config.from_flat(seed=3, enable_xla=True).to_dict()
    self.assertEqual(list(record), ["model", "data", "augment", "optim", "schedule",
                                    "distribute", "checkpoint", "monitor"])
    self.assertEqual(list(record["schedule"]), [
        "global_batch_size", "grad_accum_steps", "train_epochs", "train_steps",
        "steps_per_loop", "stop_check_steps", "epochs_between_evals", "skip_eval",
        "enable_xla", "seed", "deterministic", "progress_timeout_seconds"])
    self.assertEqual((record["schedule"]["seed"], record["schedule"]["enable_xla"]), (3, True))


if __name__ == "__main__":
  absltest.main()
