"""The train entrypoint as users run it: flags, one-line errors, a short real run."""

import glob
import os
import signal
import subprocess
import sys
import time

import resnet_dist  # pylint: disable=unused-import  # before TensorFlow: its CPU kernels
import numpy as np
import tensorflow as tf
from absl.testing import absltest

from launch import exits, tpu_install
from resnet_dist import export, models
from resnet_dist.data import records
from tests import fixtures
from tests import launching
from tests.launching import run_train


# Loads a SavedModel in a fresh process and saves what both its signatures
# return for images.npy: uint8 arrays (serving_default) and their PNG bytes
# (encoded).
PREDICT = """
import sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
out = model.signatures["serving_default"](images=tf.constant(images))
png = tf.stack([tf.io.encode_png(image) for image in images])
coded = model.signatures["encoded"](images=png)
np.savez(sys.argv[3], probabilities=out["probabilities"].numpy(), classes=out["classes"].numpy(),
         encoded_probabilities=coded["probabilities"].numpy(),
         encoded_classes=coded["classes"].numpy())
"""


class ExportEntrypointTest(absltest.TestCase):
  """launch.export as users run it; its refusals are export_test's, in-process."""

  def test_saved_model_in_a_fresh_process_predicts_as_the_model(self):
    model_dir = self.create_tempdir().full_path
    fixtures.make_run(model_dir)
    export_dir = os.path.join(model_dir, "exported")
    result = launching.run("launch.export", f"--model_dir={model_dir}",
                           f"--checkpoint={model_dir}/checkpoints/ckpt-1",
                           f"--export_dir={export_dir}")
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    # Any size, not square, not the model's 32x32.
    images = np.random.RandomState(1).randint(0, 256, (5, 45, 61, 3)).astype(np.uint8)
    np.save(os.path.join(model_dir, "images.npy"), images)
    subprocess.run([sys.executable, "-c", PREDICT, export_dir, f"{model_dir}/images.npy",
                    f"{model_dir}/exported.npz"], check=True, env=launching.ENV)
    outputs = np.load(f"{model_dir}/exported.npz")
    exported = outputs["probabilities"]
    classifier, _ = export.load_classifier(model_dir)
    expected = classifier.serve(tf.constant(images))["probabilities"].numpy()
    self.assertEqual(exported.shape, (5, 10))
    np.testing.assert_allclose(exported.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(exported, expected, atol=1e-6)
    np.testing.assert_array_equal(outputs["classes"], np.argmax(exported, -1))
    # PNG is lossless: the bytes signature decodes to the same pixels, and answers the same.
    np.testing.assert_allclose(outputs["encoded_probabilities"], exported, atol=1e-6)
    np.testing.assert_array_equal(outputs["encoded_classes"], outputs["classes"])
    # The same preprocessing as evaluation: centre crop, resize, normalise.
    centre = tf.image.resize(images[:, 3:42, 11:50], [32, 32])
    logits = classifier.model((centre - (100.0, 110.0, 120.0)) / (50.0, 60.0, 70.0))
    np.testing.assert_allclose(tf.nn.softmax(logits), expected, atol=2e-3)

  def test_safetensors_export_loads_back_as_the_model(self):
    model_dir = self.create_tempdir().full_path
    net = fixtures.make_run(model_dir)
    result = launching.run("launch.export", f"--model_dir={model_dir}", "--format=safetensors")
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    path = os.path.join(model_dir, "export", "1", "model.safetensors")
    self.assertEqual(result.stdout.strip(), f"exported {model_dir}/checkpoints/ckpt-1 to {path}")
    again = models.get_model("resnet8", num_classes=10, image_size=32)
    models.load_weights(again, path)
    for a, b in zip(net.variables, again.variables):
      np.testing.assert_array_equal(a.numpy(), b.numpy(), a.path)


class BadInputTest(absltest.TestCase):

  def assert_one_line_error(self, result, pattern):
    """Exit status 2 and stderr exactly one line: no TensorFlow start-up lines either."""
    self.assertEqual(result.returncode, 2, result.stderr)
    lines = result.stderr.strip().splitlines()
    self.assertLen(lines, 1, result.stderr)
    self.assertRegex(lines[0], "^error: .*" + pattern)

  def test_unknown_model(self):
    self.assert_one_line_error(run_train("--model=resnet9000"), r"--model=resnet9000.*resnet50")

  def test_a_bad_flag_value_of_another_entrypoint_is_one_line_too(self):
    self.assert_one_line_error(launching.run("launch.export", "--format=onnx"),
                               r"--format.*onnx")

  def test_unknown_dataset(self):
    self.assert_one_line_error(run_train("--dataset=nope"), r"--dataset must be digits")

  def test_tpu_strategy_without_a_tpu_fails_fast_and_clearly(self):
    data_dir = self.create_tempdir().full_path
    for tpu, pattern in (("", r"no TPU is attached"),
                         ("grpc://127.0.0.1:9", r"--tpu=grpc://127.0.0.1:9: cannot connect")):
      result = run_train("--strategy=tpu", f"--tpu={tpu}", f"--data_dir={data_dir}",
                         f"--model_dir={data_dir}/run", timeout=120)
      self.assert_one_line_error(result, pattern)
      self.assertFalse(os.path.exists(f"{data_dir}/run"))  # nothing written

  def test_local_tpu_on_a_pod_slice_is_refused(self):
    data_dir = self.create_tempdir().full_path
    result = subprocess.run(
        launching.command("launch.train", "--strategy=tpu", "--tpu=local",
                          f"--data_dir={data_dir}", f"--model_dir={data_dir}/run"),
        cwd=launching.ROOT, env={**launching.ENV, "TPU_ACCELERATOR_TYPE": "v4-32"},
        capture_output=True, text=True, timeout=120)
    self.assert_one_line_error(result, r"--tpu=local on a v4-32, a slice of several hosts")
    self.assertFalse(os.path.exists(f"{data_dir}/run"))

  def test_tpu_defaults_to_tpu_name(self):
    data_dir = self.create_tempdir().full_path
    result = subprocess.run(
        launching.command("launch.train", "--strategy=tpu", f"--data_dir={data_dir}",
                          f"--model_dir={data_dir}/run"),
        cwd=launching.ROOT, env={**launching.ENV, "TPU_NAME": "grpc://127.0.0.1:9"},
        capture_output=True, text=True, timeout=120)
    self.assert_one_line_error(result, r"--tpu=grpc://127.0.0.1:9: cannot connect")

  def test_auto_takes_the_tpu_given(self):
    data_dir = self.create_tempdir().full_path
    result = run_train("--tpu=grpc://127.0.0.1:9", f"--data_dir={data_dir}",
                       f"--model_dir={data_dir}/run", timeout=120)
    self.assert_one_line_error(result, r"--tpu=grpc://127.0.0.1:9: cannot connect")

  def test_helpshort_lists_the_flags(self):
    result = run_train("--helpshort")
    self.assertEqual(result.returncode, 0, result.stderr)
    for flag in ("--model", "--dataset", "--strategy", "--global_batch_size", "--dtype"):
      self.assertIn(flag, result.stdout)


class RecipesTest(absltest.TestCase):

  def test_every_recipe_parses_and_validates(self):
    recipes = sorted(glob.glob(os.path.join(launching.ROOT, "launch", "configs", "*.cfg")))
    self.assertGreaterEqual(len(recipes), 10)
    script = (
        "import sys\n"
        "from launch import exits\n"
        "from flags import definitions\n"
        "for path in sys.argv[1:]:\n"
        "  definitions.FLAGS.unparse_flags()\n"
        "  exits.parse_flags(['x', '--flagfile=' + path])\n"
        "  config = definitions.config_from_flags()\n"
        "  config.validate()\n"
        "  print(path, config.model.name, config.schedule.global_batch_size,\n"
        "        config.distribute.strategy, config.data.image_size, config.data.eval_size,\n"
        "        config.augment.policy, config.model.drop_path_rate,\n"
        "        config.data.repeated_augmentations)\n")
    result = subprocess.run([sys.executable, "-c", script, *recipes], env=launching.ENV,
                            cwd=launching.ROOT, capture_output=True, text=True, timeout=300)
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    self.assertIn("resnet50_imagenet_pod_lars.cfg resnet50 32768 tpu", result.stdout)
    self.assertIn("resnet20_cifar10.cfg resnet20 128 auto", result.stdout)
    # auto, so that the same command on every host of a cluster trains one model.
    self.assertIn("resnet50_imagenet_8gpu.cfg resnet50 1024 auto", result.stdout)
    self.assertIn("resnet50_imagenet_torchvision_v2.cfg resnet50 1024 auto 176 224 "
                  "trivialaugment_wide 0.0 4", result.stdout)
    self.assertIn("resnet50_imagenet_rsb_a1.cfg resnet50 2048 auto 224 224 "
                  "rand-m7-mstd0.5-inc1 0.05 3", result.stdout)
    self.assertIn("resnet50_imagenet_rsb_a2.cfg resnet50 2048 auto 224 224 "
                  "rand-m7-mstd0.5-inc1 0.05 3", result.stdout)
    self.assertIn("resnet50_imagenet_rsb_a3.cfg resnet50 2048 auto 160 224 "
                  "rand-m6-mstd0.5-inc1 0.0 1", result.stdout)


  def test_the_imagenet_recipes_train_a_few_steps_with_every_flag_they_set(self):
    """The torchvision and RSB recipes, each with every flag of its file
    (timm's RandAugment, stochastic depth, repeated augmentation, LAMB,
    BCE, ...) but the model, sizes and data, which the test shrinks: two
    steps of ResNet-8 on synthetic 32-pixel images and an evaluation, as
    the docs' command runs them at full size."""
    recipes = sorted(glob.glob(os.path.join(launching.ROOT, "launch", "configs",
                                            "resnet50_imagenet_*_*.cfg")))
    recipes = [r for r in recipes if "rsb" in r or "torchvision" in r]
    self.assertLen(recipes, 4)
    script = (
        "import json, sys\n"
        "from launch import exits\n"
        "from flags import definitions\n"
        "from resnet_dist import train\n"
        "for path in sys.argv[2:]:\n"
        "  definitions.FLAGS.unparse_flags()\n"
        "  exits.parse_flags(['x', '--flagfile=' + path, '--dataset=synthetic',\n"
        "                     '--model=resnet8', '--num_classes=10', '--image_size=32',\n"
        "                     '--eval_image_size=32', '--eval_resize_size=36',\n"
        "                     '--global_batch_size=16', '--grad_accum_steps=1',\n"
        "                     '--strategy=one_device', '--dtype=fp32', '--enable_xla=false',\n"
        "                     '--train_steps=2', '--steps_per_loop=1',\n"
        "                     '--model_dir=' + sys.argv[1] + '/' + path.split('/')[-1]])\n"
        "  summary = train.run(definitions.config_from_flags())\n"
        "  print(path.split('/')[-1], summary['global_step'], json.dumps(summary['train_loss']))\n")
    result = subprocess.run([sys.executable, "-c", script, self.create_tempdir().full_path,
                             *recipes], env=launching.ENV, cwd=launching.ROOT,
                            capture_output=True, text=True, timeout=600)
    self.assertEqual(result.returncode, 0, result.stderr[-2000:])
    for recipe in recipes:
      line = [l for l in result.stdout.splitlines() if l.startswith(os.path.basename(recipe))]
      self.assertLen(line, 1, result.stdout[-2000:])
      _, steps, loss = line[0].split()
      self.assertEqual(int(steps), 2)
      self.assertTrue(np.isfinite(float(loss)), line)

class TpuVmTest(absltest.TestCase):
  ARGS = ["--name=r50", "--project=proj", "--zone=europe-west4-a",
          "--data_dir=gs://b/imagenet", "--model_dir=gs://b/runs/r50"]

  def tpu_vm(self, *args):
    return subprocess.run(["bash", os.path.join(launching.ROOT, "launch", "tpu_vm.sh"), *args],
                          capture_output=True, text=True, timeout=60)

  def dry_run(self, accelerator_type, *extra):
    result = self.tpu_vm(*self.ARGS, f"--accelerator_type={accelerator_type}", "--dry_run",
                         *extra, "--", "--flagfile=launch/configs/resnet50_imagenet_tpu_v3-8.cfg")
    self.assertEqual(result.returncode, 0, result.stderr)
    lines = result.stdout.splitlines()
    self.assertTrue(all(line.startswith("+ ") for line in lines), result.stdout)
    return lines

  def assert_installs_everywhere_then_trains_detached_on_worker_0(self, lines):
    self.assertIn("git -C", lines[1])
    self.assertRegex(lines[2], r"tpu-vm scp \S+resnet_dist-r50.tar.gz r50:.* --worker=all")
    self.assertIn("python3\\ launch/tpu_install.py", lines[3])
    self.assertIn("--worker=all", lines[3])
    at = next(i for i, line in enumerate(lines) if "launch.train" in line)
    start = lines[at]
    self.assertIn("--worker=0", start)
    for part in ("nohup\\ setsid", "python3\\ -m\\ launch.train", "--strategy=tpu",
                 "--data_dir=gs://b/imagenet", "--model_dir=gs://b/runs/r50",
                 "--flagfile=launch/configs/resnet50_imagenet_tpu_v3-8.cfg",
                 "resnet_dist.status"):
      self.assertIn(part, start)
    self.assertRegex(lines[at + 1], r"ssh r50 .*--worker=0 --command=tail.*resnet_dist.status")
    # Each host's preemption and maintenance notices stop the run, saved.
    self.assertIn("--gce_metadata=http://metadata.google.internal/computeMetadata/v1", start)
    return start

  def test_one_host_trains_with_its_local_tpu(self):
    lines = self.dry_run("v3-8")
    self.assertRegex(lines[0], r"^\+ gcloud compute tpus tpu-vm create r50 --project=proj "
                               r"--zone=europe-west4-a --accelerator-type=v3-8 "
                               r"--version=tpu-vm-tf-2.21.0-pjrt-v5p-and-below$")
    start = self.assert_installs_everywhere_then_trains_detached_on_worker_0(lines)
    self.assertIn("--tpu=local", start)
    self.assertNotIn("TPU_LOAD_LIBRARY", start)
    # A PJRT runtime's variables, in the detached command (no profile is read there).
    self.assertIn("NEXT_PLUGGABLE_DEVICE_USE_C_API=true TF_PLUGGABLE_DEVICE_LIBRARY_PATH="
                  "/lib/libtpu.so python3 -m launch.train", start.replace("\\", ""))
    self.assertRegex(lines[6], r"^\+ gcloud compute tpus tpu-vm delete r50 .*--quiet$")
    self.assertLen(lines, 7)

  def test_a_pod_slice_is_driven_from_worker_0_by_name(self):
    lines = self.dry_run("v4-32")
    self.assertRegex(lines[0], r"--accelerator-type=v4-32 "
                               r"--version=tpu-vm-tf-2.21.0-pod-pjrt-v5p-and-below$")
    start = self.assert_installs_everywhere_then_trains_detached_on_worker_0(lines)
    for part in ("TPU_LOAD_LIBRARY=0", "--tpu=r50", "--tpu_zone=europe-west4-a",
                 "--gcp_project=proj"):
      self.assertIn(part, start)
    self.assertNotIn("--tpu=local", start)
    self.assertNotIn("NEXT_PLUGGABLE_DEVICE", start)  # the slice's runtime serves the chips
    # A relay on every host, before the run: any host's notice reaches worker 0.
    self.assertRegex(lines[4].replace("\\", ""), r"--worker=all --command=pkill -f "
                     r"'\[l\]aunch.notices'; .*TPU_LOAD_LIBRARY=0 nohup setsid python3 -m "
                     r"launch.notices --model_dir=gs://b/runs/r50 --gce_metadata=http://")
    self.assertIn(" delete r50 ", lines[7])

  def test_each_generation_gets_its_runtime_and_environment_from_the_table(self):
    pjrt = "NEXT_PLUGGABLE_DEVICE_USE_C_API=true TF_PLUGGABLE_DEVICE_LIBRARY_PATH=/lib/libtpu.so"
    for accelerator_type, runtime, env in (
        ("v3-8", "tpu-vm-tf-2.21.0-pjrt-v5p-and-below", pjrt),
        ("v4-32", "tpu-vm-tf-2.21.0-pod-pjrt-v5p-and-below", "TPU_LOAD_LIBRARY=0"),
        ("v5litepod-8", "tpu-vm-tf-2.21.0-pjrt-v5e-and-v6", pjrt),
        ("v6e-8", "tpu-vm-tf-2.21.0-pjrt-v5e-and-v6", pjrt)):
      result = self.tpu_vm(*self.ARGS, f"--accelerator_type={accelerator_type}", "--dry_run")
      self.assertEqual(result.returncode, 0, result.stderr)
      lines = result.stdout.splitlines()
      self.assertTrue(lines[0].endswith(f"--version={runtime}"), (accelerator_type, lines[0]))
      start = next(line for line in lines if "launch.train" in line)
      self.assertIn(f"{env} python3 -m launch.train", start.replace("\\", ""))

  def test_the_install_keeps_what_the_image_has_and_only_adds(self):
    # TensorFlow under another distribution name, as on some TPU images.
    image = {"tensorflow-tpu": "2.18.0", "keras": "3.6.0", "protobuf": "4.25.3",
             "tensorboard": "2.18.0", "absl-py": "2.1.0"}
    wanted, constraints = tpu_install.plan(
        ["# pins", "tensorflow==2.21.0", "keras==3.15.1", "tensorboard==2.21.0",
         "protobuf>=6.31.1,<8", "Absl_Py==2.5.1", "safetensors==0.8.0  # weights", ""], image)
    self.assertEqual(wanted, ["safetensors==0.8.0"])
    self.assertIn("tensorflow-tpu==2.18.0", constraints)
    self.assertLen(constraints, len(image))
    # This venv has every pin already: nothing to add, nothing replaced.
    result = subprocess.run([sys.executable, os.path.join(launching.ROOT, "launch", "tpu_install.py"),
                             "--dry_run"], capture_output=True, text=True, timeout=120)
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertEqual(result.stdout.strip(), "resnet_dist installed against the image's "
                     f"TensorFlow {tf.__version__} (0 packages added, none replaced)")

  def test_a_runtime_that_cannot_serve_the_type_stops_before_any_command(self):
    for accelerator_type, runtime, message in (
        ("v4-32", "tpu-vm-tf-2.21.0-pjrt-v5p-and-below", "is for one host, and v4-32 is a pod"),
        ("v6e-8", "tpu-vm-tf-2.21.0-se", "v6e runs only PJRT runtimes"),
        ("v3-8", "tpu-vm-tf-2.15.0-pjrt", "carries TensorFlow 2.15.0; resnet_dist needs 2.16.1"),
        ("v3-8", "tpu-ubuntu2204-base", "is not a TensorFlow runtime")):
      result = self.tpu_vm(*self.ARGS, f"--accelerator_type={accelerator_type}",
                           f"--runtime_version={runtime}", "--dry_run")
      self.assertEqual(result.returncode, 2, result.stderr)
      self.assertEqual(result.stdout, "")
      self.assertRegex(result.stderr.strip(), f"^error: --runtime_version={runtime}.*{message}")

  def with_fake_gcloud(self, home, gcloud_body, *args):
    """tpu_vm.sh against a stand-in gcloud (a bash script that logs each call
    to home/calls, then runs gcloud_body) and git (the archive it copies; the
    test's sandbox is no git checkout); (result, calls)."""
    bin_dir = self.create_tempdir().full_path
    for tool, body in (("gcloud", gcloud_body), ("git", "")):
      with open(os.path.join(bin_dir, tool), "w") as f:
        f.write(f"#!/bin/bash\necho \"$*\" >> {home}/calls\n{body}")
      os.chmod(os.path.join(bin_dir, tool), 0o755)
    result = subprocess.run(
        ["bash", os.path.join(launching.ROOT, "launch", "tpu_vm.sh"), "--poll_seconds=0", *args],
        env={**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]},
        capture_output=True, text=True, timeout=60)
    with open(os.path.join(home, "calls")) as f:
      return result, f.read().splitlines()

  def attach(self, home, gcloud_body):
    return self.with_fake_gcloud(home, gcloud_body, *self.ARGS[:3], "--attach")

  def attach_with_fake_gcloud(self, status):
    """A stand-in whose ssh runs the command here, in a home where the run ends
    (status written) on the third poll."""
    home = self.create_tempdir().full_path
    with open(os.path.join(home, "resnet_dist.log"), "w") as f:
      f.write("step 10/90\n")
    return self.attach(home, f"""polls=$(grep -c -- --command= {home}/calls)
[ "$polls" -lt 3 ] || echo "resnet_dist exited with status {status}" > {home}/resnet_dist.status
for a in "$@"; do
  case "$a" in --command=*) cd {home} && HOME={home} exec bash -c "${{a#--command=}}";; esac
done
""")

  def test_attach_polls_to_the_end_and_deletes_only_after_success(self):
    result, calls = self.attach_with_fake_gcloud(0)
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertIn("[tpu_vm] step 10/90", result.stdout)
    self.assertLen([c for c in calls if "--command=" in c], 3)
    self.assertRegex(calls[-1], r"^compute tpus tpu-vm delete r50 ")
    result, calls = self.attach_with_fake_gcloud(75)
    self.assertEqual(result.returncode, 75)
    self.assertFalse(any(" delete " in c for c in calls))
    self.assertIn("the TPU r50 is kept", result.stderr)

  def attach_with_lost_tpu(self, state):
    """A stand-in whose ssh works for the first poll and then fails (exit 255,
    as ssh does), and whose describe says `state`."""
    home = self.create_tempdir().full_path
    return self.attach(home, f"""case "$*" in *" describe "*) echo {state}; exit 0;; esac
[ "$(grep -c -- --command= {home}/calls)" -lt 2 ] || exit 255
echo "step 10/90"
""")

  def test_a_preempted_or_unreachable_tpu_ends_the_poll_with_one_line(self):
    """Catches a poll that treats every failed ssh as "no answer yet" and
    polls a preempted TPU forever, printing nothing."""
    result, calls = self.attach_with_lost_tpu("PREEMPTED")
    self.assertEqual(result.returncode, 69, result.stderr)
    self.assertLen([c for c in calls if "--command=" in c], 2)  # within two polls
    self.assertFalse(any(" delete " in c for c in calls))
    lines = result.stderr.strip().splitlines()
    self.assertLen(lines, 1, result.stderr)
    self.assertRegex(lines[0], r"^error: the TPU r50 is PREEMPTED; the run's checkpoints are "
                               r"kept .* and resume from the last checkpoint$")
    result, calls = self.attach_with_lost_tpu("READY")  # up, but worker 0 never answers
    self.assertEqual(result.returncode, 69, result.stderr)
    self.assertLen([c for c in calls if "--command=" in c], 6)  # 1 answered, then 5 failed
    self.assertIn("error: worker 0 of the TPU r50 did not answer 5 polls in a row (state "
                  "READY)", result.stderr)

  def test_a_queued_spot_tpu_is_waited_for_and_deleted_with_its_request(self):
    lines = self.dry_run("v4-32", "--queued", "--spot")
    self.assertRegex(lines[0], r"^\+ gcloud compute tpus queued-resources create r50 --node-id=r50 "
                               r".*--accelerator-type=v4-32 --runtime-version=\S+-pod-pjrt\S* --spot$")
    self.assertRegex(lines[1], r"queued-resources describe r50 .*state\.state")
    self.assertRegex(lines[-1], r"queued-resources delete r50 .* --force --quiet$")
    self.assertRegex(self.dry_run("v3-8", "--spot")[0], r"tpu-vm create r50 .* --spot$")

  def queued(self, final_answer):
    """A whole run against a stand-in gcloud whose queued resource waits two
    polls, then answers as the shell line final_answer; the run it starts
    ends at once."""
    home = self.create_tempdir().full_path
    return self.with_fake_gcloud(home, f"""case "$*" in
  *"queued-resources describe"*)
    if [ "$(grep -c 'queued-resources describe' {home}/calls)" -lt 3 ]; then
      echo WAITING_FOR_RESOURCES; else {final_answer}; fi ;;
  *"--command=tail"*) echo "resnet_dist exited with status 0" ;;
esac
""", *self.ARGS, "--accelerator_type=v4-32", "--queued", "--",
        "--flagfile=launch/configs/resnet50_imagenet_pod_lars.cfg")

  def test_a_queued_resource_trains_once_active_and_a_failed_one_is_one_line(self):
    result, calls = self.queued("echo ACTIVE")
    self.assertEqual(result.returncode, 0, result.stderr)
    self.assertEqual(result.stdout.count("[tpu_vm] queued resource r50: WAITING_FOR_RESOURCES"),
                     1)  # said once, not once a poll
    describes = [i for i, c in enumerate(calls) if "queued-resources describe" in c]
    first_ssh = next(i for i, c in enumerate(calls) if "tpu-vm ssh" in c)
    self.assertLen(describes, 3)
    self.assertLess(describes[-1], first_ssh)  # nothing is copied before the TPU exists
    self.assertRegex(calls[-1], r"^compute tpus queued-resources delete r50 .*--force")
    for answer, state in (("echo FAILED", "FAILED"),
                          ("echo 'ERROR: NOT_FOUND: r50' >&2; exit 1", "NOT_FOUND")):  # deleted
      result, calls = self.queued(answer)
      self.assertEqual(result.returncode, 69)
      self.assertRegex(result.stderr, rf"^error: the queued resource r50 is {state}; the run's "
                                      r"checkpoints are kept [^\n]*\n$")
      self.assertFalse(any(c.startswith("compute tpus tpu-vm") for c in calls))  # no TPU touched

  def test_keep_attach_delete_and_bad_arguments(self):
    self.assertNotIn(" delete ", "\n".join(self.dry_run("v3-8", "--keep")))
    attached = self.tpu_vm(*self.ARGS[:3], "--attach", "--dry_run").stdout.splitlines()
    self.assertLen(attached, 2)
    self.assertIn("--worker=0 --command=tail", attached[0])
    self.assertIn(" delete r50 ", attached[1])
    deleted = self.tpu_vm(*self.ARGS[:3], "--delete", "--dry_run").stdout.splitlines()
    self.assertEqual(deleted, ["+ gcloud compute tpus tpu-vm delete r50 --project=proj "
                               "--zone=europe-west4-a --quiet"])
    result = self.tpu_vm(*self.ARGS[:-1], "--accelerator_type=v3-8", "--model_dir=/local/dir",
                         "--dry_run")
    self.assertEqual(result.returncode, 2)
    self.assertEqual(result.stderr.strip(),
                     "error: --model_dir=/local/dir must be on GCS (gs://...): workers write it")
    result = self.tpu_vm(*self.ARGS, "--accelerator_type=v4", "--dry_run")
    self.assertEqual(result.returncode, 2)
    self.assertIn("--accelerator_type=v4 is not of the form", result.stderr)
    result = self.tpu_vm(*self.ARGS, "--accelerator_type=v3-9", "--dry_run")
    self.assertEqual(result.returncode, 2)
    self.assertEqual(result.stderr.strip(), "error: --accelerator_type=v3-9: v3 slices have a "
                                            "power of two of TensorCores from 8 (v3-8, v3-32, "
                                            "...)")
    result = self.tpu_vm("--name=x", "--dry_run")
    self.assertEqual(result.returncode, 2)
    self.assertIn("--project is required", result.stderr)


class BadDataTest(absltest.TestCase):

  def test_a_label_outside_the_classes_is_one_line_naming_the_record(self):
    data_dir = self.create_tempdir().full_path
    jpeg = tf.io.encode_jpeg(np.zeros((40, 40, 3), np.uint8)).numpy()
    records.write_imagenet_records(data_dir, "train", [jpeg] * 8, [0] * 7 + [12], 1)
    records.write_imagenet_records(data_dir, "validation", [jpeg] * 4, [0] * 4, 1)
    result = run_train("--dataset=imagenet", f"--data_dir={data_dir}", "--num_classes=10",
                       "--model=resnet8", "--global_batch_size=8", "--train_steps=2",
                       "--strategy=one_device", f"--model_dir={data_dir}/run")
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    errors = result.stderr.splitlines()  # all of stderr: the one line, nothing beside it
    self.assertEqual(errors, [f"error: label 12 is outside 0..9: record 7 of "
                              f"{data_dir}/train-00000-of-00001"])

  def test_a_split_of_undecodable_images_stops_at_start_naming_it(self):
    # Training skips undecodable images; with nothing else it would wait forever.
    data_dir = self.create_tempdir().full_path
    jpeg = tf.io.encode_jpeg(np.zeros((40, 40, 3), np.uint8)).numpy()
    records.write_imagenet_records(data_dir, "train", [jpeg] * 8, [0] * 8, 1)
    records.write_imagenet_records(data_dir, "validation", [b"", jpeg[:100]] * 2, [0] * 4, 1)
    result = run_train("--dataset=imagenet", f"--data_dir={data_dir}", "--num_classes=10",
                       "--model=resnet8", "--global_batch_size=8", "--train_steps=2",
                       "--strategy=one_device", f"--model_dir={data_dir}/run")
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    errors = result.stderr.splitlines()  # all of stderr: the one line, nothing beside it
    self.assertEqual(errors, ["error: none of 4 images sampled from the validation split can "
                              "be decoded (empty, cut short, or not JPEG, PNG, GIF, BMP or WebP)"])
    self.assertFalse(os.path.exists(f"{data_dir}/run/checkpoints"))

  def test_strict_data_names_a_record_without_a_label_in_one_line(self):
    data_dir = self.create_tempdir().full_path
    jpeg = tf.io.encode_jpeg(np.zeros((40, 40, 3), np.uint8)).numpy()
    records.write_imagenet_records(data_dir, "validation", [jpeg] * 4, [0] * 4, 1)
    with tf.io.TFRecordWriter(f"{data_dir}/train-00000-of-00001") as writer:
      for i in range(8):
        feature = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[jpeg]))}
        if i != 5:
          feature["image/class/label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))
        writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                     .SerializeToString())
    result = run_train("--dataset=imagenet", f"--data_dir={data_dir}", "--num_classes=10",
                       "--model=resnet8", "--global_batch_size=8", "--train_steps=2",
                       "--strategy=one_device", "--strict_data", f"--model_dir={data_dir}/run")
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    self.assertRegex(result.stderr.strip(), r"^error: a record has no image/class/label: "
                     r"record 5 of \S+/train-00000-of-00001; every record needs "
                     r"image/encoded and image/class/label$")

  def test_a_folder_of_empty_jpgs_stops_at_start(self):
    root = self.create_tempdir().full_path
    for split in ("train", "val"):
      for label in ("cat", "dog"):
        os.makedirs(os.path.join(root, split, label))
        for i in range(3):
          open(os.path.join(root, split, label, f"{i}.jpg"), "wb").close()
    result = run_train(f"--dataset=folder:{root}", "--model=resnet8", "--global_batch_size=2",
                       "--train_steps=2", "--strategy=one_device", f"--model_dir={root}/run",
                       timeout=300)
    self.assertEqual(result.returncode, 2, result.stderr[-2000:])
    errors = result.stderr.splitlines()  # all of stderr: the one line, nothing beside it
    self.assertLen(errors, 1, result.stderr[-2000:])
    self.assertRegex(errors[0], r"^error: none of 6 images sampled from the \w+ split can be "
                                r"decoded")


class StartAndEndTest(absltest.TestCase):

  def start(self, tmp, *args):
    return subprocess.Popen(launching.command("launch.train", *args), cwd=launching.ROOT,
                            env={**launching.ENV, "TMPDIR": tmp}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

  def test_a_killed_runs_temp_files_go_with_the_next_start_and_sigint_there_is_one_line(self):
    tmp = self.create_tempdir().full_path
    killed = self.start(tmp, "--dataset=synthetic", "--num_classes=10", "--model=resnet8",
                        "--strategy=one_device", "--global_batch_size=8", "--train_steps=10000",
                        "--steps_per_loop=1", "--log_every_steps=1", "--skip_eval",
                        f"--model_dir={tmp}/run")
    for line in killed.stdout:
      if line.startswith("step "):
        break
    own = exits.tempdir_of(tmp, killed.pid)
    self.assertNotEmpty(glob.glob(os.path.join(own, "__autograph_generated_file*.py")))
    killed.kill()
    killed.communicate()
    self.assertCountEqual(os.listdir(tmp), ["run", os.path.basename(own)])

    starting = self.start(tmp, "--flagfile=launch/configs/digits.cfg", f"--model_dir={tmp}/b")
    # launch.exits makes its temp dir once its SIGINT handler is in place;
    # TensorFlow's imports, seconds of them, follow.
    deadline = time.time() + 60
    while (not os.path.exists(exits.tempdir_of(tmp, starting.pid))
           and starting.poll() is None and time.time() < deadline):
      time.sleep(0.01)
    starting.send_signal(signal.SIGINT)
    _, stderr = starting.communicate(timeout=60)
    self.assertEqual(starting.returncode, 130, stderr)
    self.assertEqual(stderr, "error: interrupted (SIGINT) while starting; nothing was written\n")
    self.assertEqual(os.listdir(tmp), ["run"])  # both temp dirs gone, the run's files kept


if __name__ == "__main__":
  absltest.main()
