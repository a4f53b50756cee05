"""The READMEs stay true: the Quick start runs, the commands are CI's, links
resolve, commands name modules that exist, and result tables are the raw
files' own rows."""

import os
import pathlib
import re
import runpy

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
EXPERIMENTS_README = REPO / "experiments" / "README.md"
BENCH_README = REPO / "experiments" / "bench" / "README.md"
RESULTS = REPO / "experiments" / "results"
ALL_READMES = (REPO / "README.md", EXPERIMENTS_README, BENCH_README)


def _blocks(lang, text=README):
  """The contents of the fenced blocks of language ``lang`` ('' = none)."""
  blocks, current, current_lang = [], None, None
  for line in text.splitlines(keepends=True):
    fence = re.match(r"\s*```(\w*)\s*$", line)
    if fence and current is None:
      current, current_lang = [], fence.group(1)
    elif fence:
      if current_lang == lang:
        blocks.append("".join(current))
      current = None
    elif current is not None:
      current.append(line)
  return blocks


def test_quick_start_runs(tmp_path, monkeypatch):
  (code,) = [b for b in _blocks("python") if "nnx.Optimizer" in b]
  assert code.count("/tmp/mlp_1bit.safetensors") == 2  # export, then load
  path = tmp_path / "mlp_1bit.safetensors"
  code = code.replace("/tmp/mlp_1bit.safetensors", str(path))
  script = tmp_path / "quick_start.py"
  script.write_text(code)
  monkeypatch.chdir(tmp_path)
  ns = runpy.run_path(str(script))
  assert ns["report"].rows  # the size table has a row per leaf
  assert os.path.getsize(path) > 0
  import blaq_jax  # pylint: disable=g-import-not-at-top
  names = set(blaq_jax.read_export(path).leaves)
  # The whole model state: kernels, biases and batch norm statistics.
  assert {"fc1/kernel", "fc2/kernel", "fc2/bias", "bn/mean",
          "bn/var"} <= names
  assert float(ns["loss"]) > 0


def test_readme_is_short():
  assert len(README.splitlines()) <= 200


def test_fresh_machine_commands_match_ci():
  bash = _blocks("bash")
  test_cmd = next(b for b in bash if "pytest" in b).strip()
  assert test_cmd == ("python3 -m venv .venv && .venv/bin/pip install -e "
                      "'.[test]' && .venv/bin/python -m pytest -q -n 2")
  ci = (REPO / ".ci" / "run").read_text()  # the same steps, quieter pip
  for step in ("python3 -m venv .venv", ".venv/bin/pip install -q -e '.[test]'",
               ".venv/bin/python -m pytest -q -n 2\n"):
    assert step in ci
  # `-n 2` needs pytest-xdist, from the extra the command installs.
  import tomllib  # pylint: disable=g-import-not-at-top
  extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
      "optional-dependencies"]
  assert any(d.startswith("pytest-xdist") for d in extras["test"])
  main_cmd = next(b for b in bash if "experiments.compare" in b).strip()
  assert main_cmd.startswith("python3 -m venv .venv && .venv/bin/pip install "
                             "-e '.[experiments]' && ")
  assert "--config experiments/configs/quick.py" in main_cmd
  assert (REPO / "experiments" / "configs" / "quick.py").exists()


def test_the_test_extra_builds_the_docs():
  """The one test command also covers the docs: sphinx is in [test]."""
  import tomllib  # pylint: disable=g-import-not-at-top
  project = tomllib.loads((REPO / "pyproject.toml").read_text())
  extras = project["project"]["optional-dependencies"]
  assert any(d.startswith("sphinx") for d in extras["docs"])
  assert any("docs" in d for d in extras["test"] if d.startswith("blaq_jax["))
  pytest_opts = project["tool"]["pytest"]["ini_options"]
  assert "docs" in pytest_opts["testpaths"]
  assert "--doctest-glob=*.rst" in pytest_opts["addopts"]
  assert (REPO / "tests" / "test_docs.py").exists()
  # The generic name `experiments` is not installed as a package.
  assert project["tool"]["setuptools"]["packages"]["find"]["include"] == [
      "blaq_jax*"]


@pytest.mark.parametrize("readme", ALL_READMES, ids=lambda p: p.parent.name)
def test_relative_links_resolve(readme):
  text = readme.read_text()
  links = re.findall(r"\]\(([^)\s]+)\)", text)
  assert links
  for link in links:
    if re.match(r"[a-z]+://", link):
      continue
    target = link.split("#")[0]
    assert (readme.parent / target).exists(), f"{readme}: broken link {link}"


@pytest.mark.parametrize("readme", ALL_READMES, ids=lambda p: p.parent.name)
def test_commands_name_modules_that_exist(readme):
  modules = re.findall(r"python3? -m (experiments(?:\.\w+)+)", readme.read_text())
  assert modules or readme == REPO / "README.md"
  for module in set(modules):
    path = REPO.joinpath(*module.split("."))
    assert (path.with_suffix(".py").is_file()
            or (path / "__main__.py").is_file()), f"{readme}: {module}"


def _raw_lines():
  lines = set()
  for f in RESULTS.rglob("*"):
    if f.is_file() and f.suffix in (".md", ".txt"):
      lines.update(line.rstrip() for line in f.read_text().splitlines())
  return lines


def test_experiment_tables_are_rows_of_raw_files():
  """Every result table row on the page is a row of a file in results/."""
  raw = _raw_lines()
  rows = [line.rstrip() for line in EXPERIMENTS_README.read_text().splitlines()
          if line.startswith("|")]
  assert len(rows) > 50
  missing = [row for row in rows if row not in raw]
  assert not missing, "rows not in experiments/results:\n" + "\n".join(missing)


def test_benchmark_outputs_are_raw_files():
  raw = _raw_lines()
  outputs = _blocks("", BENCH_README.read_text())
  assert len(outputs) == 18
  for block in outputs:
    missing = [line for line in block.splitlines()
               if line.strip() and line.rstrip() not in raw]
    assert not missing, "\n".join(missing)
