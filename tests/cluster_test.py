"""A host handed a cluster of several tasks trains one model with the others,
or refuses with one line: never a model of its own.

(That two processes so started train the weights one device does is
tests/equivalence_test.py, started as the README says.)
"""

import json
import os
import subprocess
from unittest import mock

from absl.testing import absltest, parameterized

from launch import exits, kubernetes
from resnet_dist import cluster as cluster_lib
from resnet_dist import collectives
from resnet_dist import strategy as strategy_lib
from resnet_dist.config import DistributeConfig
from resnet_dist.errors import ConfigError
from tests import launching


def tf_config(num_workers, index=0, chief=False):
  jobs = {"worker": [f"127.0.0.1:{2000 + i}" for i in range(num_workers)]}
  task = {"type": "worker", "index": index}
  if chief:
    jobs["chief"] = ["127.0.0.1:1999"]
    task = {"type": "chief", "index": 0}
  return json.dumps({"cluster": jobs, "task": task})


def cluster_of(num_workers, **kwargs):
  return cluster_lib.from_environment(environ={"TF_CONFIG": tf_config(num_workers, **kwargs)})


def srun_environment(procid, localid, node="n01", **extra):
  """What srun -N2 --ntasks-per-node=2 sets in one task (SLURM 22.05)."""
  return {"SLURM_JOB_ID": "4321", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n[01-02]",
          "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NUM_TASKS": "4",
          "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
          "SLURMD_NODENAME": node, **extra}


def pod_environment(index, num_workers=3, **job):
  """What a pod of launch.kubernetes's Indexed Job sees: the container's
  variables from the manifest, and the index Kubernetes adds."""
  _, env = launching.pod_of(kubernetes.Job("train", "image", ["--model_dir=gs://b/r"],
                                           num_workers, **job))
  return {"JOB_COMPLETION_INDEX": str(index), "KUBERNETES_SERVICE_HOST": "10.0.0.1", **env}


class ClusterTest(parameterized.TestCase):

  def test_tf_config_gives_every_training_task_the_chief_first(self):
    cluster = cluster_of(2, chief=True)
    self.assertEqual(cluster.tasks, ("127.0.0.1:1999", "127.0.0.1:2000", "127.0.0.1:2001"))
    self.assertEqual((cluster.task_type, cluster.task_index, cluster.num_tasks), ("chief", 0, 3))
    self.assertEqual(cluster.source, "TF_CONFIG")

  def test_no_or_empty_tf_config_is_no_cluster(self):
    self.assertIsNone(cluster_lib.from_environment(environ={}))
    self.assertIsNone(cluster_lib.from_environment(environ={"TF_CONFIG": " "}))

  @parameterized.named_parameters(
      ("not_json", "{worker", "TF_CONFIG is not valid JSON"),
      ("no_cluster", '{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG has no "cluster"'),
      ("index_outside", tf_config(2, index=2), "is not one of its cluster's chief or worker"),
      ("parameter_server", json.dumps({"cluster": {"worker": ["a:1"], "ps": ["b:1"]},
                                       "task": {"type": "ps", "index": 0}}),
       "is not one of its cluster's chief or worker"),
      ("two_chiefs", json.dumps({"cluster": {"chief": ["a:1", "b:1"], "worker": ["c:1"]},
                                 "task": {"type": "worker", "index": 0}}),
       'TF_CONFIG\'s "chief" job has 2 tasks; it takes one'))
  def test_a_malformed_tf_config_is_one_line_naming_it(self, text, message):
    with self.assertRaisesRegex(ConfigError, message) as raised:
      cluster_lib.from_environment(environ={"TF_CONFIG": text})
    self.assertNotIn("\n", str(raised.exception))


class ChooseKindTest(parameterized.TestCase):
  """strategy.choose_kind: what --strategy means in a given cluster. A
  broken choice that ignores the cluster (the recipe's own --strategy winning,
  as absl lets a --flagfile after it do) trains N models and fails here."""

  def setUp(self):
    super().setUp()
    # No TPU on this machine, whatever its environment says.
    patcher = mock.patch.object(strategy_lib.cluster_lib, "tpu_attached", return_value=False)
    patcher.start()
    self.addCleanup(patcher.stop)

  def test_auto_in_a_cluster_of_several_tasks_is_multi_worker(self):
    for cluster in (cluster_of(2), cluster_of(2, index=1), cluster_of(1, chief=True)):
      self.assertEqual(strategy_lib.choose_kind("auto", cluster), "multi_worker_mirrored")

  def test_auto_alone_or_in_a_cluster_of_one_task_is_one_host(self):
    self.assertEqual(strategy_lib.choose_kind("auto", None), "mirrored")
    self.assertEqual(strategy_lib.choose_kind("auto", cluster_of(1)), "mirrored")
    self.assertEqual(strategy_lib.choose_kind("auto", None, tpu="my-tpu"), "tpu")

  @parameterized.parameters("one_device", "mirrored", "tpu")
  def test_a_one_host_strategy_in_a_cluster_of_several_tasks_is_refused(self, kind):
    with self.assertRaises(ConfigError) as raised:
      strategy_lib.choose_kind(kind, cluster_of(2, index=1))
    message = str(raised.exception)
    self.assertEqual(message, f"--strategy={kind} would train a separate model on each of the 2 "
                              f"tasks TF_CONFIG names; give --strategy=auto or "
                              f"multi_worker_mirrored (after any --flagfile), or unset TF_CONFIG")

  def test_a_named_tpu_in_a_cluster_of_several_tasks_is_refused(self):
    with self.assertRaisesRegex(ConfigError, "^--tpu=my-tpu would train a separate model"):
      strategy_lib.choose_kind("auto", cluster_of(2), tpu="my-tpu")

  def test_multi_worker_needs_a_cluster(self):
    self.assertEqual(strategy_lib.choose_kind("multi_worker_mirrored", cluster_of(1)),
                     "multi_worker_mirrored")
    with self.assertRaisesRegex(ConfigError, "needs a cluster: set TF_CONFIG"):
      strategy_lib.choose_kind("multi_worker_mirrored", None)

  def test_create_strategy_refuses_before_building_anything(self):
    with mock.patch.dict("os.environ", {"TF_CONFIG": tf_config(2)}), \
        mock.patch.object(strategy_lib.tf.distribute, "MirroredStrategy") as built:
      with self.assertRaisesRegex(ConfigError, "^--strategy=mirrored would train"):
        strategy_lib.create_strategy(DistributeConfig(strategy="mirrored"))
    built.assert_not_called()


class SlurmTest(parameterized.TestCase):
  """The cluster of an srun job step (the real srun's tasks: slurm_test)."""

  def test_hostlists_expand_as_slurm_writes_them(self):
    self.assertEqual(cluster_lib.expand_hostlist("gpu[01-03,7],login"),
                     ["gpu01", "gpu02", "gpu03", "gpu7", "login"])
    self.assertEqual(cluster_lib.expand_hostlist("rack[1-2]-n[8-9]"),
                     ["rack1-n8", "rack1-n9", "rack2-n8", "rack2-n9"])
    self.assertEqual(cluster_lib.expand_hostlist("a-host"), ["a-host"])
    self.assertEqual(cluster_lib.expand_tasks_per_node("2(x3),1"), [2, 2, 2, 1])

  def test_tasks_are_ranked_node_by_node_each_on_its_own_port(self):
    cluster = cluster_lib.from_environment(environ=srun_environment(3, 1, node="n02"))
    base = cluster_lib.slurm_port(srun_environment(3, 1), 0)
    self.assertEqual(cluster.tasks, (f"n01:{base}", f"n01:{base + 1}",
                                     f"n02:{base}", f"n02:{base + 1}"))
    self.assertEqual((cluster.source, cluster.task_index, cluster.local_tasks,
                      cluster.local_index), ("SLURM", 3, 2, 1))
    self.assertEqual(strategy_lib.choose_kind("auto", cluster), "multi_worker_mirrored")
    given = cluster_lib.from_environment("slurm", srun_environment(0, 0), port=7000)
    self.assertEqual(given.tasks[:2], ("n01:7000", "n01:7001"))

  def test_derived_ports_stay_below_the_ephemeral_range_and_apart(self):
    # Linux hands out 32768-60999 for outgoing connections: a port there may be taken.
    bases = [cluster_lib.slurm_port({"SLURM_JOB_ID": str(job)}, 0) for job in range(0, 200000, 7)]
    self.assertGreaterEqual(min(bases), 1024)
    self.assertLess(max(bases) + 15, 32768)  # 16 tasks a node
    neighbours = [cluster_lib.slurm_port({"SLURM_JOB_ID": str(job)}, 0) for job in range(1000)]
    self.assertLen(set(neighbours), 1000)  # jobs submitted together never share a port
    # A site that reserves ports for steps (srun --resv-ports): those.
    reserved = srun_environment(3, 1, node="n02", SLURM_STEP_RESV_PORTS="30100-30101")
    self.assertEqual(cluster_lib.from_environment(environ=reserved).tasks[2:],
                     ("n02:30100", "n02:30101"))

  def test_tf_config_wins_over_slurm_under_auto(self):
    environ = {**srun_environment(0, 0), "TF_CONFIG": tf_config(2)}
    self.assertEqual(cluster_lib.from_environment(environ=environ).source, "TF_CONFIG")

  def test_a_task_out_of_block_order_is_refused(self):
    # srun --distribution=cyclic puts rank 1 on the second node.
    with self.assertRaisesRegex(ConfigError, r"^SLURM task 1 \(local task 0 on n02\) is not "
                                             r"where block distribution puts it: run srun "
                                             r"with --distribution=block$"):
      cluster_lib.from_environment(environ=srun_environment(1, 0, node="n02"))
    # Without SLURMD_NODENAME (an older SLURM, a container): no "None" in the line.
    environ = srun_environment(1, 1, node="n02")
    del environ["SLURMD_NODENAME"]
    environ["SLURM_LOCALID"] = "0"
    with self.assertRaisesRegex(ConfigError, r"^SLURM task 1 \(local task 0\) is not where"):
      cluster_lib.from_environment(environ=environ)

  def test_slurm_asked_for_outside_srun_is_one_line(self):
    environ = {"SLURM_JOB_ID": "4321", "SLURM_PROCID": "0"}  # a batch script's own shell
    self.assertIsNone(cluster_lib.from_environment(environ=environ))
    with self.assertRaisesRegex(ConfigError, "^--cluster=slurm outside an srun job step"):
      cluster_lib.from_environment("slurm", environ)

  def test_every_task_of_a_node_takes_its_share_of_the_gpus(self):
    # --gres=gpu:4 with 2 tasks a node: SLURM shows both tasks all four.
    environ = srun_environment(3, 1, node="n02", SLURM_GPUS_ON_NODE="4",
                               CUDA_VISIBLE_DEVICES="0,1,2,3")
    cluster = cluster_lib.from_environment(environ=environ)
    cluster_lib.claim_local_gpus(cluster, environ)
    self.assertEqual(environ["CUDA_VISIBLE_DEVICES"], "2,3")
    # --gpus-per-task=2: bound already, left alone.
    environ = srun_environment(3, 1, node="n02", SLURM_GPUS_ON_NODE="4",
                               CUDA_VISIBLE_DEVICES="1,3")
    self.assertIsNone(cluster_lib.local_gpus(cluster_lib.from_environment(environ=environ),
                                             environ))
    # No GPUs: nothing to share.
    environ = srun_environment(3, 1, node="n02")
    self.assertIsNone(cluster_lib.local_gpus(cluster_lib.from_environment(environ=environ),
                                             environ))


def fake_gpus(kind):
  """tf.config.list_physical_devices on a host of 8 GPUs, as CUDA shows them
  to a process: those CUDA_VISIBLE_DEVICES names, else all 8."""
  if kind != "GPU":
    return [strategy_lib.tf.config.PhysicalDevice("/physical_device:CPU:0", "CPU")]
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  count = len(visible.split(",")) if visible else 8
  return [strategy_lib.tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU")
          for i in range(count)]


class TaskGpusTest(parameterized.TestCase):
  """Every task of a cluster trains on its GPUs: the resolver each source
  gives MultiWorkerMirroredStrategy, on a host TensorFlow is told has 8
  GPUs, and the replica devices TensorFlow's own rule derives from it. (A
  resolver without its GPUs gave every SLURM and Kubernetes task one CPU
  replica.)"""

  def strategy_resolver(self, environ, gpus=fake_gpus, **distribute):
    """The resolver create_strategy hands MultiWorkerMirroredStrategy (mocked:
    a real one waits for its peers), and the devices TensorFlow derives."""
    with mock.patch.dict("os.environ", environ, clear=True), \
        mock.patch.object(strategy_lib.tf.config, "list_physical_devices", gpus), \
        mock.patch.object(strategy_lib.tf.distribute, "MultiWorkerMirroredStrategy") as built:
      strategy_lib.create_strategy(DistributeConfig(**distribute))
      resolver = built.call_args.kwargs["cluster_resolver"]
      return resolver, strategy_lib.task_devices(resolver)

  @parameterized.named_parameters(
      ("tf_config", {"TF_CONFIG": tf_config(2)}, 8),
      ("slurm_a_task_per_node", srun_environment(1, 0, node="n02",
                                                 SLURM_STEP_TASKS_PER_NODE="1(x2)",
                                                 SLURM_STEP_NODELIST="n[01-02]",
                                                 SLURM_GPUS_ON_NODE="8"), 8),
      # --gres=gpu:8 with 8 tasks a node: each task claims its one GPU.
      ("slurm_a_task_per_gpu", srun_environment(3, 3, node="n01",
                                                SLURM_STEP_TASKS_PER_NODE="8(x2)",
                                                SLURM_GPUS_ON_NODE="8"), 1),
      # --gpus-per-task=1: SLURM bound each task to its GPU already.
      ("slurm_bound_per_gpu", srun_environment(3, 3, node="n01",
                                               SLURM_STEP_TASKS_PER_NODE="8(x2)",
                                               SLURM_GPUS_ON_NODE="8",
                                               CUDA_VISIBLE_DEVICES="3"), 1),
      ("kubernetes", pod_environment(1), 8))
  def test_each_task_holds_a_replica_on_every_gpu_it_owns(self, environ, gpus):
    resolver, devices = self.strategy_resolver(environ)
    self.assertEqual(devices, tuple(f"/device:GPU:{i}" for i in range(gpus)))
    self.assertEqual(resolver.num_accelerators(), {"GPU": gpus})

  def test_a_tf_config_chief_stays_the_chief(self):
    resolver, _ = self.strategy_resolver({"TF_CONFIG": tf_config(2, chief=True)})
    self.assertEqual(resolver.cluster_spec().as_dict(),
                     {"chief": ["127.0.0.1:1999"],
                      "worker": ["127.0.0.1:2000", "127.0.0.1:2001"]})
    self.assertEqual((resolver.task_type, resolver.task_id), ("chief", 0))

  def test_a_task_whose_gpus_were_listed_before_it_claimed_its_share_is_refused(self):
    # TensorFlow keeps the GPUs it listed first: a claim after that changes nothing.
    environ = srun_environment(3, 3, node="n01", SLURM_STEP_TASKS_PER_NODE="8(x2)",
                               SLURM_GPUS_ON_NODE="8")
    all_eight = lambda kind: fake_gpus(kind) if kind != "GPU" else [
        strategy_lib.tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU")
        for i in range(8)]
    with self.assertRaisesRegex(ConfigError, r"^this task sees 8 GPUs, not its share of 1 "
                                             r"\(8 tasks on a node of 8\)"):
      self.strategy_resolver(environ, gpus=all_eight)

  def test_the_entrypoints_claim_the_tasks_gpus_before_tensorflow_loads(self):
    environ = srun_environment(3, 3, node="n01", SLURM_STEP_TASKS_PER_NODE="8(x2)",
                               SLURM_GPUS_ON_NODE="8", TF_CPP_MIN_LOG_LEVEL="3")
    with mock.patch.dict("os.environ", environ, clear=True):
      with exits.quiet_start():
        claimed = os.environ.get("CUDA_VISIBLE_DEVICES")
    self.assertEqual(claimed, "3")

  def test_num_gpus_limits_each_tasks_gpus(self):
    _, devices = self.strategy_resolver(pod_environment(0), num_gpus=4)
    self.assertLen(devices, 4)
    with self.assertRaisesRegex(ConfigError, r"^--num_gpus=9 but 8 GPU\(s\) are visible"):
      self.strategy_resolver(pod_environment(0), num_gpus=9)

  def test_a_task_that_would_leave_its_gpus_idle_is_refused_before_the_strategy(self):
    # The resolver as it was built before: no accelerators named.
    original = cluster_lib.Cluster.resolver
    plain = lambda cluster, num_gpus: original(cluster, 0)
    with mock.patch.object(cluster_lib.Cluster, "resolver", plain), \
        self.assertRaisesRegex(ConfigError, r"^this task sees 8 GPU\(s\) but "
                                            r"multi_worker_mirrored would train on 0 of them"):
      self.strategy_resolver(pod_environment(0))

  def test_a_cpu_cluster_keeps_one_cpu_replica_per_task(self):
    with mock.patch.dict("os.environ", pod_environment(0), clear=True):
      cluster = cluster_lib.from_environment()
    self.assertEqual(strategy_lib.task_devices(cluster.resolver(0)), ("/device:CPU:0",))


class KubernetesTest(parameterized.TestCase):
  """launch.kubernetes's manifest and the cluster its pods read from it."""

  def test_the_pods_index_is_the_task_and_the_service_names_every_worker(self):
    cluster = cluster_lib.from_environment(environ=pod_environment(2, port=2345))
    self.assertEqual(cluster.tasks, tuple(f"train-{i}.train:2345" for i in range(3)))
    self.assertEqual((cluster.source, cluster.task_type, cluster.task_index),
                     ("Kubernetes", "worker", 2))

  def test_the_manifest_is_an_indexed_job_whose_pods_resolve_under_its_service(self):
    job = kubernetes.Job("r50", "registry/resnet_dist:1", ["--flagfile=f.cfg",
                                                          "--model_dir=/runs/r50"],
                         num_workers=4, gpus_per_worker=8, volume="runs:/runs")
    service, indexed = json.loads(json.dumps(kubernetes.manifest(job)))["items"]
    pod = indexed["spec"]["template"]
    self.assertEqual((service["kind"], service["spec"]["clusterIP"]), ("Service", "None"))
    self.assertEqual(service["spec"]["selector"], pod["metadata"]["labels"])
    # Pod i is named r50-i (Indexed Job) in the subdomain r50 (the Service).
    self.assertEqual(pod["spec"]["subdomain"], service["metadata"]["name"])
    spec = indexed["spec"]
    self.assertEqual((spec["completionMode"], spec["completions"], spec["parallelism"]),
                     ("Indexed", 4, 4))
    container, = pod["spec"]["containers"]
    self.assertEqual(container["args"], ["--flagfile=f.cfg", "--model_dir=/runs/r50",
                                         "--cluster=kubernetes"])
    self.assertEqual(container["resources"], {"limits": {"nvidia.com/gpu": 8}})
    self.assertIn({"name": "shared", "mountPath": "/runs"}, container["volumeMounts"])
    # Replacements wait for the pod they replace; a lost node's pods go in 30 s.
    self.assertEqual(spec["podReplacementPolicy"], "Failed")
    self.assertEqual({(t["key"], t["tolerationSeconds"]) for t in pod["spec"]["tolerations"]},
                     {("node.kubernetes.io/unreachable", 30),
                      ("node.kubernetes.io/not-ready", 30)})

  def test_an_incident_costs_one_retry_of_the_worker_that_caused_it(self):
    """Kubernetes' pod failure policy, applied as Kubernetes applies it (the
    first rule that matches: FailJob, Ignore, else Count), to what each of 4
    workers exits with in each incident."""
    spec = kubernetes.manifest(kubernetes.Job("r", "i", ["--model_dir=gs://b/r"],
                                              num_workers=4))["items"][1]["spec"]
    rules = spec["podFailurePolicy"]["rules"]

    def verdict(status, disrupted=False):
      for rule in rules:
        codes = rule.get("onExitCodes")
        if codes and codes["containerName"] == kubernetes.CONTAINER and status in codes["values"]:
          return rule["action"]
        if disrupted and {"type": "DisruptionTarget"} in rule.get("onPodConditions", []):
          return rule["action"]
      return "Count"

    incidents = {
        # worker 1 crashes; the others lose it
        "a crash": [verdict(69), verdict(1), verdict(69), verdict(69)],
        # worker 2's VM is preempted; every worker saves at the same step
        "a preemption": [verdict(75), verdict(75), verdict(75, disrupted=True), verdict(75)],
        # worker 3's node is lost: evicted with a DisruptionTarget; the others lose it
        "a lost node": [verdict(69), verdict(69), verdict(69), verdict(137, disrupted=True)],
        # a stuck peer: every worker's watchdog ends it
        "a stall": [verdict(70)] * 4,
        "bad flags": [verdict(2)] * 4,
    }
    self.assertEqual(incidents["a crash"], ["Ignore", "Count", "Ignore", "Ignore"])
    self.assertEqual(incidents["a preemption"], ["Ignore"] * 4)
    self.assertEqual(incidents["a lost node"], ["Ignore"] * 4)
    self.assertEqual(incidents["a stall"], ["Count"] * 4)  # one retry of each index
    self.assertEqual(incidents["bad flags"], ["FailJob"] * 4)
    # Counted per index where the cluster has per-index limits, else in all.
    self.assertEqual((spec["backoffLimitPerIndex"], spec["maxFailedIndexes"],
                      spec["backoffLimit"]), (3, 0, 12))

  def test_the_readme_command_prints_the_manifest_and_refuses_a_bad_name_in_one_line(self):
    command = launching.command("launch.kubernetes", "--name=r50", "--image=registry/r:1",
                                "--num_workers=3", "--gpus_per_worker=8", "--",
                                "--flagfile=launch/configs/resnet50_imagenet_8gpu.cfg",
                                "--data_dir=gs://BUCKET/imagenet",
                                "--model_dir=gs://BUCKET/runs/r50")
    result = subprocess.run(command, cwd=launching.ROOT, env=launching.ENV,
                            capture_output=True, text=True, timeout=60)
    self.assertEqual(result.returncode, 0, result.stderr)
    service, job = json.loads(result.stdout)["items"]  # what kubectl apply -f - reads
    self.assertEqual((service["kind"], job["kind"], job["spec"]["completions"]),
                     ("Service", "Job", 3))
    self.assertEqual(job["spec"]["template"]["spec"]["containers"][0]["args"],
                     ["--flagfile=launch/configs/resnet50_imagenet_8gpu.cfg",
                      "--data_dir=gs://BUCKET/imagenet", "--model_dir=gs://BUCKET/runs/r50",
                      "--cluster=kubernetes"])
    bad = subprocess.run([*command[:3], "--name=R50", "--image=i"], cwd=launching.ROOT,
                         env=launching.ENV, capture_output=True, text=True, timeout=60)
    self.assertEqual((bad.returncode, bad.stdout), (2, ""))
    self.assertEqual(bad.stderr.count("\n"), 1, bad.stderr)
    self.assertRegex(bad.stderr, r"^error: --name='R50' must be a DNS label")

  @parameterized.named_parameters(
      ("capitals", {"name": "R50"}, "must be a DNS label"),
      ("too_long", {"name": "r" * 62}, "short enough for"),
      ("relative_mount", {"name": "r", "volume": "runs:runs"}, "CLAIM:/absolute/path"),
      # Each pod would write into its own container; a replaced one would start over.
      ("no_model_dir", {"name": "r", "train_args": ["--flagfile=launch/configs/digits.cfg"]},
       r"^the training flags need a --model_dir every pod reaches \(gs://BUCKET/\.\.\., or "
       r"a path under --volume's mount\): each pod would write"),
      ("model_dir_in_the_container", {"name": "r", "train_args": ["--model_dir=runs/r"]},
       r"reaches \(gs://BUCKET/\.\.\., or a path under --volume's mount\), not runs/r:"),
      ("model_dir_beside_the_volume", {"name": "r", "volume": "c:/shared",
                                       "train_args": ["--model_dir=/sharedx/r"]},
       r"or a path under --volume's /shared\), not /sharedx/r:"))
  def test_a_manifest_that_kubernetes_would_refuse_is_one_line(self, fields, message):
    job = kubernetes.Job(**{"image": "i", "train_args": ["--model_dir=gs://b/r"],
                            "num_workers": 10, **fields})
    with self.assertRaisesRegex(kubernetes.ManifestError, message):
      kubernetes.manifest(job)

  @parameterized.named_parameters(
      ("no_workers", {"RESNET_DIST_NUM_WORKERS": ""}, "needs RESNET_DIST_NUM_WORKERS"),
      ("index_outside", {"JOB_COMPLETION_INDEX": "3"}, "outside 3 workers"),
      ("no_index_in_address", {"RESNET_DIST_WORKER_ADDRESS": "w:2222"}, "has no {index}"))
  def test_a_wrong_pod_environment_is_one_line(self, change, message):
    with self.assertRaisesRegex(ConfigError, message):
      cluster_lib.from_environment("kubernetes", {**pod_environment(0), **change})


class GpuThreadsTest(absltest.TestCase):
  """Catches GPU kernel launches left in TensorFlow's shared pool, where the
  input pipeline's threads delay them, and a setting that overrides the user's."""

  def test_create_strategy_gives_each_gpu_its_own_threads_unless_told_otherwise(self):
    self.assertEqual(strategy_lib.gpu_thread_environment("gpu_private"),
                     {"TF_GPU_THREAD_MODE": "gpu_private", "TF_GPU_THREAD_COUNT": "2"})
    self.assertEqual(strategy_lib.gpu_thread_environment("global"), {})
    for mode, preset, expected in (("gpu_private", {}, "gpu_private"),
                                   ("gpu_private", {"TF_GPU_THREAD_MODE": "gpu_shared"},
                                    "gpu_shared"),
                                   ("global", {}, None)):
      with mock.patch.dict("os.environ", preset, clear=True):
        strategy_lib.create_strategy(DistributeConfig(strategy="one_device",
                                                      gpu_thread_mode=mode))
        self.assertEqual(os.environ.get("TF_GPU_THREAD_MODE"), expected, (mode, preset))
        self.assertIn(expected or "global", strategy_lib.describe_gpu_threads())


class AllReduceTest(parameterized.TestCase):
  """--all_reduce as the devices allow it (the ops a step then launches:
  accelerator_test.CollectivesTest)."""

  @parameterized.parameters(
      ("auto", "mirrored", True, "nccl"), ("auto", "mirrored", False, "ring"),
      ("auto", "multi_worker_mirrored", True, "nccl"),
      ("auto", "multi_worker_mirrored", False, "ring"),
      ("ring", "multi_worker_mirrored", True, "ring"), ("nccl", "mirrored", True, "nccl"),
      ("auto", "tpu", False, "tpu"), ("auto", "one_device", True, "none"))
  def test_auto_is_nccl_between_gpus_and_ring_between_cpus(self, asked, kind, gpus, chosen):
    all_reduce = collectives.choose_all_reduce(DistributeConfig(all_reduce=asked), kind, gpus)
    self.assertEqual(all_reduce.implementation, chosen)

  @parameterized.parameters(
      ("nccl", "mirrored", False, "^--all_reduce=nccl needs GPUs"),
      ("nccl", "multi_worker_mirrored", False, "^--all_reduce=nccl needs GPUs"),
      ("ring", "tpu", False, "all-reduces over the TPU interconnect"),
      ("nccl", "one_device", True, "has one replica"))
  def test_an_implementation_the_devices_lack_is_one_line(self, asked, kind, gpus, message):
    with self.assertRaisesRegex(ConfigError, message):
      collectives.choose_all_reduce(DistributeConfig(all_reduce=asked), kind, gpus)

  @parameterized.parameters(("auto", "mirrored"), ("ring", "multi_worker_mirrored"),
                            ("nccl", "multi_worker_mirrored"))
  def test_bf16_on_the_wire_between_gpus_is_refused_and_fine_between_cpus(self, asked, kind):
    distribute = DistributeConfig(all_reduce=asked, all_reduce_dtype="bf16")
    with self.assertRaisesRegex(ConfigError, r"^--all_reduce_dtype=bf16: TensorFlow's GPU "
                                             r"collectives \(NCCL and ring\) cannot sum"):
      collectives.choose_all_reduce(distribute, kind, True)
    self.assertEqual(collectives.choose_all_reduce(
        DistributeConfig(all_reduce_dtype="bf16"), kind, False).dtype, "bf16")
    self.assertEqual(collectives.choose_all_reduce(
        DistributeConfig(all_reduce_dtype="fp16"), kind, True).dtype, "fp16")

  def test_the_strategy_is_built_with_the_chosen_collectives(self):
    # Mocked: a real MultiWorkerMirroredStrategy waits for its peers.
    environ = {"TF_CONFIG": tf_config(2)}
    with mock.patch.dict("os.environ", environ), \
        mock.patch.object(strategy_lib.tf.distribute, "MultiWorkerMirroredStrategy") as built:
      strategy_lib.create_strategy(DistributeConfig(collective_timeout_seconds=30))
      self.assertEqual(built.call_args.kwargs["cluster_resolver"].task_type, "worker")
    options = built.call_args.kwargs["communication_options"]
    self.assertEqual(options.implementation,
                     strategy_lib.tf.distribute.experimental.CommunicationImplementation.RING)
    self.assertEqual(options.timeout_seconds, 30)

  def test_nccl_on_cpus_is_refused_before_a_strategy_is_built(self):
    with mock.patch.dict("os.environ", {"TF_CONFIG": tf_config(2)}), \
        mock.patch.object(strategy_lib.tf.distribute, "MultiWorkerMirroredStrategy") as built:
      with self.assertRaisesRegex(ConfigError, "^--all_reduce=nccl needs GPUs"):
        strategy_lib.create_strategy(DistributeConfig(all_reduce="nccl"))
    built.assert_not_called()

  def test_a_slurm_cluster_reaches_the_strategy_as_its_resolver(self):
    with mock.patch.dict("os.environ", srun_environment(2, 0, node="n02"), clear=True), \
        mock.patch.object(strategy_lib.tf.distribute, "MultiWorkerMirroredStrategy") as built:
      strategy_lib.create_strategy(DistributeConfig(cluster_port=9000))
    resolver = built.call_args.kwargs["cluster_resolver"]
    self.assertEqual(resolver.cluster_spec().as_dict(),
                     {"worker": ["n01:9000", "n01:9001", "n02:9000", "n02:9001"]})
    self.assertEqual((resolver.task_type, resolver.task_id), ("worker", 2))

  def test_packs_are_counted_as_tensorflow_groups_them(self):
    shapes = [[600], [100], [300], [50]]  # float32: 2400, 400, 1200, 200 bytes
    values = [strategy_lib.tf.zeros(s) for s in shapes]
    packs = lambda n, dtype="fp32": collectives.AllReduce("ring", n, dtype).num_packs(values)
    # Last value first; a pack closes once it holds more than the pack size.
    self.assertEqual(packs(1000), 2)   # [200, 1200] [400, 2400]
    self.assertEqual(packs(100), 4)
    self.assertEqual(packs(0), 1)
    self.assertEqual(packs(500, "bf16"), 2)   # [100, 600] [200, 1200]
    self.assertEqual(packs(150, "bf16"), 3)   # [100, 600] [200] [1200]


if __name__ == "__main__":
  absltest.main()
