"""The documentation site builds, and a broken reference fails the build.

The pages' own ``>>>`` examples run as doctests of ``docs/*.rst`` (see
``--doctest-glob`` in pyproject.toml); here Sphinx builds the HTML with
autodoc, napoleon and nitpicky references, the way CI does.
"""

import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

# Warnings from docstrings in library files the documentation does not own;
# each entry is (object the docstring belongs to, text of
# the warning). Delete an entry once its docstring is fixed: the build is
# then clean with -W. Any other warning fails the test.
KNOWN_WARNINGS = (
)

_PROBLEM = re.compile(r"(^|: )(WARNING|ERROR|SEVERE|CRITICAL): ")


def _build(srcdir, outdir, warnings_file, confdir=None):
  cmd = [sys.executable, "-m", "sphinx", "-E", "-q", "--keep-going",
         "-b", "html", "-w", str(warnings_file)]
  if confdir is not None:
    cmd += ["-c", str(confdir)]
  out = subprocess.run(cmd + [str(srcdir), str(outdir)], cwd=REPO,
                       capture_output=True, text=True, timeout=900,
                       check=False)
  problems = [line for line in warnings_file.read_text().splitlines()
              if _PROBLEM.search(line)]
  return out, problems


def _unexpected(problems):
  return [line for line in problems
          if not any(f"docstring of {obj}:" in line and text in line
                     for obj, text in KNOWN_WARNINGS)]


def test_docs_build_without_new_warnings(tmp_path):
  out, problems = _build(REPO / "docs", tmp_path / "html",
                         tmp_path / "warnings.txt")
  assert out.returncode == 0, out.stderr[-4000:]
  unexpected = _unexpected(problems)
  assert not unexpected, "Sphinx warnings:\n" + "\n".join(unexpected)
  for page in ("index", "methods", "optax", "nnx", "checkpoints",
               "multi_device", "api", "modules"):
    assert (tmp_path / "html" / f"{page}.html").is_file(), page
  api = (tmp_path / "html" / "api.html").read_text()
  for name in ("blaq_jax.laq", "blaq_jax.blaq", "blaq_jax.quantized_params",
               "blaq_jax.export", "blaq_jax.nnx_grad_fn"):
    assert f'id="{name}"' in api, name


def test_a_broken_reference_fails_the_build(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  (src / "index.rst").write_text(
      "Check\n=====\n\n.. autofunction:: blaq_jax.laq\n"
      ".. autofunction:: blaq_jax.quantized_params\n\n"
      "See :func:`blaq_jax.laq`, :func:`blaq_jax.state.quantized_params` "
      "and :func:`blaq_jax.no_such_function`.\n\n"
      ".. autofunction:: blaq_jax.no_such_function\n")
  _, problems = _build(src, tmp_path / "html", tmp_path / "warnings.txt",
                       confdir=REPO / "docs")
  text = "\n".join(_unexpected(problems))
  assert "no_such_function" in text
  assert "reference target not found: blaq_jax.no_such_function" in text
  assert "failed to import 'no_such_function'" in text
  # A name documented under its public alias is not a broken reference,
  # whichever module defines it.
  assert "blaq_jax.state.quantized_params" not in text
  assert "reference target not found: blaq_jax.laq" not in text


def test_all_is_the_documented_api():
  """``blaq_jax.__all__`` holds exactly the names docs/api.rst documents
  (functions and classes by bare name, modules by their pages), once each,
  and ``from blaq_jax import *`` imports them."""
  import blaq_jax
  api = (REPO / "docs" / "api.rst").read_text()
  documented = set(re.findall(r"^\.\. auto(?:function|class):: (\w+)$", api,
                              re.M))
  documented |= set(re.findall(
      r"^\.\. auto(?:module|function):: blaq_jax\.(\w+)(?:\.\w+)?$", api, re.M))
  assert len(blaq_jax.__all__) == len(set(blaq_jax.__all__))
  assert sorted(blaq_jax.__all__) == sorted(documented)
  namespace = {}
  exec("from blaq_jax import *", namespace)  # pylint: disable=exec-used
  assert set(blaq_jax.__all__) <= set(namespace)
