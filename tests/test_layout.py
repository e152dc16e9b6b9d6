"""The layout the README's table states: each package imports only what its row allows, no library
imports a command, and config.py / languages.py stay at the bottom."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "apollo_jax")


def _imports(path) -> set:
  """Top-level apollo_jax names a file imports (`from apollo_jax.data import x` -> data)."""
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "apollo_jax":
      parts = node.module.split(".")
      out |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
    elif isinstance(node, ast.Import):
      out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("apollo_jax.")}
  return out


def _package_imports() -> dict:
  deps = {}
  for d, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), PKG)
        name = rel.split(os.sep)[0] if os.sep in rel else rel[:-3]
        deps.setdefault(name, set()).update(_imports(os.path.join(d, f)) - {name})
  return deps


def _readme_rules() -> dict:
  """{package: allowed imports} from the README's layout rows `| `apollo_jax/X/` | ... | ... |`."""
  rules = {}
  for line in open(os.path.join(ROOT, "README.md"), encoding="utf-8"):
    m = re.match(r"\| `apollo_jax/(\w+)/` \|[^|]*\|([^|]*)\|", line)
    if m:
      rules[m.group(1)] = {t.split(".")[0] for t in re.findall(r"`([\w.]+)`", m.group(2))}
  return rules


def test_packages_import_what_the_readme_allows():
  rules, deps = _readme_rules(), _package_imports()
  packages = {n for n in os.listdir(PKG) if os.path.isdir(os.path.join(PKG, n)) and n != "__pycache__"}
  assert set(rules) == packages                       # every package has its row
  for name in packages:
    assert deps.get(name, set()) <= rules[name], (name, deps[name] - rules[name])


def test_no_library_imports_a_command_and_the_bottom_stays_the_bottom():
  deps = _package_imports()
  commands = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py")} - {"__init__", "config", "languages"}
  for name, used in deps.items():
    if name not in commands:
      assert not used & commands, (name, used & commands)
  assert deps["config"] <= {"languages"} and not deps.get("languages")
