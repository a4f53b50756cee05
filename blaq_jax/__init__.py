"""blaq_jax: loss-aware low-bit weight quantization (LAQ, BLAQ) for Optax.

The model computes with quantized weights ``q = alpha * beta``; the
transforms keep the latent full-precision weights, the moments and the scales
in their state (the codes follow from the latent weights) and emit
``updates`` that land the params on the level set.

Example:
  >>> import optax, blaq_jax
  >>> # Clipping given as preprocess reaches BLAQ's trial gradient too (a
  >>> # clip chained before blaq would clip the main gradient only).
  >>> opt = blaq_jax.blaq(1e-3, preprocess=optax.clip_by_global_norm(1.0))
"""

from blaq_jax import methods
from blaq_jax.levels import LevelSet
from blaq_jax.nnx_utils import nnx_grad_fn
from blaq_jax.nnx_utils import nnx_loss_fn
from blaq_jax.alias import blaq
from blaq_jax.alias import laq
from blaq_jax.state import LossAwareState
from blaq_jax.state import QuantizedLatentState
from blaq_jax.state import TrialState
from blaq_jax.state import check_on_level_set
from blaq_jax.state import curvature
from blaq_jax.projection import project
from blaq_jax.schedules import every_n_steps
from blaq_jax.schedules import never
from blaq_jax.schedules import one_epoch_every
from blaq_jax.selection import default_quantize
from blaq_jax.selection import path_str
from blaq_jax.state import Diagnostics
from blaq_jax.state import LeafScale
from blaq_jax.state import QuantizedTensor
from blaq_jax.state import codes
from blaq_jax.state import latent_params
from blaq_jax.state import quantized_params
from blaq_jax.state import quantized_tensors
from blaq_jax.state import scales
from blaq_jax.state import StepCost
from blaq_jax.state import step_cost

# STE family (BinaryConnect, BWN, TWN, generic STE) and quantizers.
from blaq_jax import quantizers
from blaq_jax.alias import binary_connect
from blaq_jax.alias import bwn
from blaq_jax.alias import ste
from blaq_jax.alias import twn
from blaq_jax.state import STEState

# FOGZO and n-SPSA.
from blaq_jax.alias import fogzo
from blaq_jax.alias import n_spsa
from blaq_jax.fogzo import fogzo_gradient
from blaq_jax.state import FOGZOState

# Packed low-bit export, loading and size summary.
from blaq_jax.export import export, load, read_export
from blaq_jax.summary import summary

__version__ = "0.1.0"

# The public API: every name documented in docs/api.rst, and the modules
# whose pages it links (tests/test_docs.py holds the two to each other).
__all__ = [
    # Methods (blaq_jax.alias) and every method by name.
    "laq", "blaq", "ste", "binary_connect", "bwn", "twn", "fogzo", "n_spsa",
    "fogzo_gradient", "methods",
    # Schedules for BLAQ's (and FOGZO's) active.
    "one_epoch_every", "every_n_steps", "never",
    # Reading the optimizer state.
    "quantized_params", "latent_params", "codes", "scales",
    "quantized_tensors", "step_cost", "check_on_level_set", "curvature",
    "QuantizedLatentState", "LossAwareState", "TrialState", "STEState",
    "FOGZOState", "StepCost", "Diagnostics", "QuantizedTensor", "LeafScale",
    # Level sets, projection and which leaves are quantized.
    "LevelSet", "project", "default_quantize", "path_str", "quantizers",
    # Flax NNX.
    "nnx_grad_fn", "nnx_loss_fn",
    # Export, loading and size.
    "export", "load", "read_export", "summary",
]
