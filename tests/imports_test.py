"""The project's modules import one another without cycles.

A cycle works in Python only while every import in it stays where it is
(often hidden inside a function), and a rename breaks it only when a graph is
traced. So every import counts here, at module level or inside a function,
but for those under `if typing.TYPE_CHECKING:`, which never run (a type
named in an annotation). The modules are read as text: nothing is imported,
and the test needs no TensorFlow.
"""

import ast
import os

from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("resnet_dist", "flags", "launch")


def project_modules():
  """{dotted name: path} of every module of the project's packages."""
  modules = {}
  for package in PACKAGES:
    for directory, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(directory, name)
          dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          modules[dotted.removesuffix(".__init__")] = path
  return modules


def _type_checking_only(tree):
  """The import nodes under `if TYPE_CHECKING:` (or typing.TYPE_CHECKING)."""
  skipped = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
      skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
  return skipped


def imported(tree, modules):
  """The project modules a module's imports name, wherever they stand."""
  found, skipped = set(), _type_checking_only(tree)
  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from a import b` imports the module a.b where there is one, else a.
      for alias in node.names:
        child = f"{node.module}.{alias.name}"
        found.add(child if child in modules else node.module)
  return {name for name in found if name in modules}


def import_graph():
  modules = project_modules()
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      graph[name] = imported(ast.parse(f.read(), path), modules) - {name}
  return graph


def find_cycle(graph):
  """One cycle of the graph as a list of its modules, or None."""
  state = {}  # name -> "open" while on the current path, "done" after

  def visit(name, path):
    state[name] = "open"
    for other in sorted(graph[name]):
      if state.get(other) == "open":
        return path[path.index(other):] + [other]
      if other not in state:
        cycle = visit(other, path + [other])
        if cycle:
          return cycle
    state[name] = "done"
    return None

  for name in sorted(graph):
    if name not in state:
      cycle = visit(name, [name])
      if cycle:
        return cycle
  return None


class ImportCycleTest(absltest.TestCase):

  def test_the_project_has_no_import_cycle(self):
    cycle = find_cycle(import_graph())
    self.assertIsNone(cycle, f"an import cycle: {' -> '.join(cycle or [])}")

  def test_a_cycle_is_found_where_there_is_one(self):
    self.assertEqual(find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}),
                     ["a", "b", "c", "a"])
    self.assertIsNone(find_cycle({"a": {"b"}, "b": set()}))

  def test_imports_inside_functions_count(self):
    tree = ast.parse("def f():\n  from resnet_dist import train\n")
    self.assertEqual(imported(tree, {"resnet_dist.train": ""}), {"resnet_dist.train"})

  def test_imports_for_annotations_alone_do_not(self):
    tree = ast.parse("import typing\nif typing.TYPE_CHECKING:\n  from resnet_dist import train\n")
    self.assertEqual(imported(tree, {"resnet_dist.train": ""}), set())

  def test_the_graph_holds_the_library(self):
    graph = import_graph()
    self.assertIn("resnet_dist.trainer", graph["resnet_dist.train"])
    self.assertIn("resnet_dist.data.augment_ops", graph["resnet_dist.data.augment"])


if __name__ == "__main__":
  absltest.main()
