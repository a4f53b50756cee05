"""Sphinx configuration of the blaq_jax documentation.

Build (CI runs this through tests/test_docs.py, warnings are errors):

  sphinx-build -W --keep-going -b html docs docs/_build/html

The examples in the pages are doctests; pytest runs them (``--doctest-glob``
in pyproject.toml), so the README's single test command covers them.
"""

import os
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

import blaq_jax  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "blaq_jax"
author = "blaq_jax contributors"
copyright = "2026, blaq_jax contributors"  # pylint: disable=redefined-builtin
release = blaq_jax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

master_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = []

# -- autodoc / napoleon ------------------------------------------------------
# Pages name public objects (``blaq_jax.laq``), never private module paths,
# so moving code between modules does not break the build.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# A reference to a blaq_jax name that does not exist is an error (with -W).
# Names from other libraries are not linked (no network for intersphinx).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|np|numpy|optax|flax|nnx|chex|typing|collections"
               r"|os|pathlib|ml_dtypes|safetensors|orbax)(\..*)?"),
    (r"py:.*", r"(\w+\.)*(Any|Callable|Optional|Union|Sequence|Mapping"
               r"|NamedTuple|PathLike|ScalarOrSchedule|Active|Quantize|Scale"
               r"|PyTree|Array|ArrayLike)"),
]

# -- HTML --------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"blaq_jax {release}"
html_static_path = []


# -- References to re-exported names ------------------------------------------
# Docstrings may name an object by the module that defines it
# (``blaq_jax.state.QuantizedTensor``) or by its bare name (``Summary``); the
# pages document it under its public name (``blaq_jax.QuantizedTensor``). Such
# a reference resolves to the one documented object whose dotted name ends
# like the target; a name documented nowhere stays a nitpicky warning.


def _resolve_by_suffix(app, env, node, contnode):
  """``missing-reference`` handler: match the target's trailing components.

  Only objects of a type the role accepts count (``:func:`` finds functions
  and methods, not classes); among several, the public top-level name
  ``blaq_jax.<name>`` wins; otherwise an ambiguous target stays unresolved.
  """
  # pylint: disable=g-import-not-at-top
  from sphinx.util.nodes import make_refnode
  if node.get("refdomain") != "py":
    return None
  target = node.get("reftarget", "").lstrip(".~")
  if not target.startswith("blaq_jax.") and "." in target:
    return None  # another library's name
  domain = env.get_domain("py")
  objtypes = set(domain.objtypes_for_role(node.get("reftype", "obj")) or ())
  parts = target.split(".")
  for n in range(len(parts), 0, -1):
    suffix = ".".join(parts[-n:])
    if suffix == "blaq_jax":
      continue
    found = [name for name, obj in domain.objects.items()
             if name.startswith("blaq_jax.") and obj.objtype != "module"
             and (not objtypes or obj.objtype in objtypes)
             and (name == suffix or name.endswith("." + suffix))]
    if len(found) > 1:
      found = [name for name in found if name == "blaq_jax." + suffix]
    if len(found) == 1:
      obj = domain.objects[found[0]]
      return make_refnode(app.builder, node["refdoc"], obj.docname,
                          obj.node_id, contnode, found[0])
    if found:
      return None
  return None


def setup(app):
  app.connect("missing-reference", _resolve_by_suffix)
