"""Tests of bit packing, the packed export / load round trip and summary."""

import json
import math
import pathlib
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blaq_jax
from blaq_jax import packing
from blaq_jax.export import ExportError, read_export
from blaq_jax.selection import path_str

# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_numpy_and_jnp_agree_and_round_trip(bits):
  rng = np.random.default_rng(bits)
  pack_jit = jax.jit(packing.pack_bits_jnp, static_argnums=1)
  unpack_jit = jax.jit(packing.unpack_bits_jnp, static_argnums=(1, 2))
  for n in (1, 3, 7, 8, 9, 15, 64, 101):
    codes = rng.integers(0, 2 ** bits, n).astype(np.uint8)
    packed = packing.pack_bits(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (math.ceil(n * bits / 8),)
    np.testing.assert_array_equal(packing.unpack_bits(packed, bits, n), codes)
    np.testing.assert_array_equal(np.asarray(pack_jit(codes, bits)), packed)
    np.testing.assert_array_equal(
        np.asarray(unpack_jit(jnp.asarray(packed), bits, n)), codes)


def test_pack_bits_layout_is_little_endian_contiguous():
  # 3-bit codes straddle bytes: code i occupies stream bits 3i..3i+2.
  codes = np.array([5, 3, 6], np.uint8)
  stream = "".join(format(int(c), "03b")[::-1] for c in codes)  # LSB first
  stream += "0" * (-len(stream) % 8)
  expected = [int(stream[i:i + 8][::-1], 2) for i in range(0, len(stream), 8)]
  assert packing.pack_bits(codes, 3).tolist() == expected


def test_pack_bits_bad_input():
  with pytest.raises(ValueError, match="do not fit in 2 bits"):
    packing.pack_bits(np.array([4], np.uint8), 2)
  with pytest.raises(ValueError, match="unsigned"):
    packing.pack_bits(np.array([1], np.int32), 2)
  with pytest.raises(ValueError, match="bits must be"):
    packing.pack_bits(np.array([1], np.uint8), 9)
  with pytest.raises(ValueError, match="take 2 bytes"):
    packing.unpack_bits(np.zeros(3, np.uint8), 1, 9)
  with pytest.raises(ValueError, match="padding"):
    packing.unpack_bits(np.array([0, 2], np.uint8), 1, 9)
  with pytest.raises(ValueError, match="packed must be a 1-D uint8 array, got "
                     "int32"):
    packing.unpack_bits(np.zeros(2, np.int32), 1, 9)
  with pytest.raises(ValueError, match=r"3 codes of 1 bits take 1 bytes, got "
                     r"shape \(3,\)"):
    packing.unpack_bits_jnp(jnp.zeros(3, jnp.uint8), 1, 3)


# ---------------------------------------------------------------- export

_SHAPES = {"a/kernel": (3, 5), "b/w": (7,), "c/w": (1,), "d/kernel": (2, 3, 3)}


def _tree(seed=0):
  keys = jax.random.split(jax.random.key(seed), 8)
  return {
      "a": {"kernel": jax.random.normal(keys[0], (3, 5)),
            "bias": jax.random.normal(keys[1], (5,))},
      "b": {"w": jax.random.normal(keys[2], (7,)),
            "scale": jax.random.normal(keys[3], (7,)).astype(jnp.bfloat16)},
      "c": {"w": jax.random.normal(keys[4], (1,))},
      "d": {"kernel": jax.random.normal(keys[5], (2, 3, 3)).astype(
          jnp.bfloat16)},
  }


def _rule(path, leaf):
  return path_str(path) in _SHAPES


def _train(params, opt, steps=2, seed=0):
  state = opt.init(params)
  loss = lambda p: sum(jnp.sum(jnp.sin(3 * x.astype(jnp.float32)) * (i + 1))
                       for i, x in enumerate(jax.tree.leaves(p)))
  grad_fn = jax.grad(loss)
  for _ in range(steps):
    updates, state = opt.update(grad_fn(params), state, params,
                                grad_fn=grad_fn)
    params = optax.apply_updates(params, updates)
  del seed
  return params, state


def _assert_bit_equal(a, b, name=""):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape, name
  np.testing.assert_array_equal(a.reshape(-1).view(np.uint8),
                                b.reshape(-1).view(np.uint8), name)


def _payload_bytes(path):
  data = pathlib.Path(path).read_bytes()
  return len(data) - 8 - struct.unpack("<Q", data[:8])[0]


_CONFIGS = [("blaq", b) for b in (1, 2, 4, 8)] + [
    (k, b) for k in ("linear", "log") for b in (2, 4, 8)]


@pytest.mark.parametrize("channel_axis", [None, -1])
@pytest.mark.parametrize("kind,bits", _CONFIGS)
def test_round_trip_is_bit_exact(tmp_path, kind, bits, channel_axis):
  make = blaq_jax.blaq if bits == 2 else blaq_jax.laq
  opt = make(0.05, bits=bits, level_set=kind, quantize=_rule,
             channel_axis=channel_axis)
  params, state = _train(_tree(bits), opt)
  path = blaq_jax.export(tmp_path / "m.safetensors", params, state,
                         metadata={"run": "test"})
  expected = blaq_jax.quantized_params(params, state)
  named = {path_str(p): x
           for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}

  flat = blaq_jax.load(path)
  assert list(flat) == sorted(named)
  for name, x in named.items():
    _assert_bit_equal(flat[name], x, name)
  restored = blaq_jax.load(path, params)
  assert jax.tree.structure(restored) == jax.tree.structure(params)
  jax.tree.map(_assert_bit_equal, restored, expected)
  # The in-memory params are the quantized weights up to apply_updates' ulp.
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x.astype(jnp.float32), restored),
      jax.tree.map(lambda x: x.astype(jnp.float32), params), rtol=2e-2,
      atol=1e-6)

  contents = read_export(path)
  assert contents.metadata == {"run": "test"}
  assert contents.header["library_version"] == blaq_jax.__version__
  qts = {path_str(p): t for p, t in jax.tree_util.tree_flatten_with_path(
      blaq_jax.quantized_tensors(state),
      is_leaf=lambda x: isinstance(x, blaq_jax.QuantizedTensor))[0]
         if isinstance(t, blaq_jax.QuantizedTensor)}
  assert set(qts) == set(_SHAPES)
  for name, qt in qts.items():
    leaf = contents.leaves[name]
    n = math.prod(_SHAPES[name])
    assert leaf.packed.shape == (math.ceil(n * bits / 8),), name
    assert leaf.level_set == qt.level_set and leaf.channel_axis == channel_axis
    np.testing.assert_array_equal(leaf.codes(), np.asarray(qt.codes))
    _assert_bit_equal(leaf.alpha, qt.alpha, name)
  # The file holds exactly what summary() counts: packed codes + scales.
  assert _payload_bytes(path) == blaq_jax.summary(
      params, state, print_fn=None).packed_bytes


def test_export_params_superset_and_load_subset(tmp_path):
  """Extra leaves (e.g. batch statistics) ride along; strict=False drops them."""
  opt = blaq_jax.laq(0.05, quantize=_rule)
  params, state = _train(_tree(), opt)
  full = {"params": params, "stats": {"mean": jnp.arange(3.0)}}
  with pytest.raises(ExportError, match="missing from params"):
    blaq_jax.export(tmp_path / "x.safetensors", full, state)
  both = dict(params, stats={"mean": jnp.arange(3.0)})
  path = blaq_jax.export(tmp_path / "m.safetensors", both, state)
  with pytest.raises(ExportError, match=r"not in params_like: \['stats/mean'\]"):
    blaq_jax.load(path, params)
  sub = blaq_jax.load(path, params, strict=False)
  jax.tree.map(_assert_bit_equal, sub,
               blaq_jax.quantized_params(params, state))
  abstract = jax.eval_shape(lambda: both)
  np.testing.assert_array_equal(blaq_jax.load(path, abstract)["stats"]["mean"],
                                np.arange(3.0))


def test_export_without_state_stores_full_precision(tmp_path):
  params = _tree()
  path = blaq_jax.export(tmp_path / "fp.safetensors", params, None)
  jax.tree.map(_assert_bit_equal, blaq_jax.load(path, params), params)
  assert _payload_bytes(path) == sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  opt = blaq_jax.laq(0.05, bits=1, quantize=_rule)
  params, state = _train(_tree(), opt)
  path = blaq_jax.export(tmp_path_factory.mktemp("exp") / "m.safetensors",
                         params, state)
  return path, params, state


def test_export_rejects_params_from_another_step(tmp_path, exported):
  _, params, state = exported
  stale = jax.tree.map(lambda x: -x, params)
  with pytest.raises(ExportError, match="'a/kernel' is not the quantized"):
    blaq_jax.export(tmp_path / "s.safetensors", stale, state)
  assert not (tmp_path / "s.safetensors").exists()
  with pytest.raises(ExportError, match="JSON"):
    blaq_jax.export(tmp_path / "s.safetensors", params, state,
                    metadata={"x": object()})


def _corrupt(src, dst, fn):
  data = bytearray(pathlib.Path(src).read_bytes())
  pathlib.Path(dst).write_bytes(bytes(fn(data)))
  return dst


def test_corrupted_payload_byte(tmp_path, exported):
  path = exported[0]

  def flip(data):
    data[-3] ^= 0x10
    return data

  bad = _corrupt(path, tmp_path / "bad.safetensors", flip)
  with pytest.raises(ExportError, match="fails its SHA-256 checksum"):
    blaq_jax.load(bad)


@pytest.mark.parametrize("keep", [0, 5, 40, -1])
def test_truncated_file(tmp_path, exported, keep):
  path = exported[0]
  size = path.stat().st_size
  cut = size - 1 if keep == -1 else keep
  bad = _corrupt(path, tmp_path / "cut.safetensors", lambda d: d[:cut])
  with pytest.raises(ExportError, match="truncated|corrupt"):
    blaq_jax.load(bad)


def _rewrite_header(src, dst, edit):
  data = pathlib.Path(src).read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  head = json.loads(data[8:8 + n])
  header = json.loads(head["__metadata__"]["blaq_jax"])
  edit(header)
  text = json.dumps(header, sort_keys=True)
  import hashlib  # pylint: disable=g-import-not-at-top
  head["__metadata__"]["blaq_jax"] = text
  head["__metadata__"]["blaq_jax_sha256"] = hashlib.sha256(
      text.encode()).hexdigest()
  raw = json.dumps(head).encode()
  raw += b" " * (-len(raw) % 8)
  pathlib.Path(dst).write_bytes(struct.pack("<Q", len(raw)) + raw
                                + data[8 + n:])
  return dst


def test_newer_format_version(tmp_path, exported):
  bad = _rewrite_header(exported[0], tmp_path / "new.safetensors",
                        lambda h: h.update(format_version=99))
  with pytest.raises(ExportError, match="newer blaq_jax"):
    blaq_jax.load(bad)
  # Unchanged but re-encoded header still loads: the edit is what fails.
  same = _rewrite_header(exported[0], tmp_path / "same.safetensors",
                         lambda h: None)
  assert set(blaq_jax.load(same)) == set(blaq_jax.load(exported[0]))


def test_header_edit_without_checksum_is_detected(tmp_path, exported):
  path = exported[0]
  data = path.read_bytes()
  bad = data.replace(b'\\"bits\\": 1', b'\\"bits\\": 2', 1)
  assert bad != data
  (tmp_path / "h.safetensors").write_bytes(bad)
  with pytest.raises(ExportError, match="header fails its checksum"):
    blaq_jax.load(tmp_path / "h.safetensors")


def _rebuild(src, dst, edit):
  """Rewrites an export through ``edit(header, tensors)``, ``tensors`` being
  ``{name: {"dtype", "shape", "data"}}``, with every checksum made to match
  the result, so that only the loader's structural checks can find the
  change. ``edit`` may return a string: the header's new text, as is."""
  import hashlib  # pylint: disable=g-import-not-at-top
  sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
  data = pathlib.Path(src).read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  head = json.loads(data[8:8 + n])
  header = json.loads(head.pop("__metadata__")["blaq_jax"])
  body = data[8 + n:]
  tensors = {k: dict(dtype=v["dtype"], shape=v["shape"],
                     data=body[slice(*v["data_offsets"])])
             for k, v in head.items()}
  text = edit(header, tensors)
  for name, spec in header["leaves"].items():
    for key, tensor in (("sha256", name), ("codes_sha256", name + ":codes"),
                        ("alpha_sha256", name + ":alpha")):
      if key in spec and tensor in tensors:
        spec[key] = sha(tensors[tensor]["data"])
  if not isinstance(text, str):
    text = json.dumps(header, sort_keys=True)
  out = {"__metadata__": {"blaq_jax": text,
                          "blaq_jax_sha256": sha(text.encode())}}
  offset = 0
  for k, t in tensors.items():
    out[k] = {"dtype": t["dtype"], "shape": t["shape"],
              "data_offsets": [offset, offset + len(t["data"])]}
    offset += len(t["data"])
  raw = json.dumps(out).encode()
  raw += b" " * (-len(raw) % 8)
  pathlib.Path(dst).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(
      t["data"] for t in tensors.values()))
  return dst


def _set_padding_bit(header, tensors):
  # 15 one-bit codes in 2 bytes: the top bit of the second is padding.
  codes = tensors["a/kernel:codes"]
  codes["data"] = codes["data"][:1] + bytes([codes["data"][1] | 0x80])


def _linear_2_bit_codes_of_3(header, tensors):
  # 15 ternary codes (levels 0..2) in 2 bits: every code 3, padding zero.
  header["leaves"]["a/kernel"].update(level_set="linear", bits=2)
  tensors["a/kernel:codes"].update(shape=[4], data=b"\xff\xff\xff\x3f")


# Each edit damages one thing a valid export promises; the checksums match.
_DAMAGE = {
    "missing tensor": (lambda h, t: t.pop("a/kernel:alpha"),
                       r"tensor 'a/kernel:alpha' is missing"),
    "unsupported dtype": (
        lambda h, t: t["a/bias"].update(dtype="F8_E4M3", shape=[20]),
        "tensor 'a/bias' has unsupported dtype F8_E4M3"),
    "stored shape": (lambda h, t: t["a/bias"].update(shape=[5, 1]),
                     r"leaf 'a/bias' is stored as float32\[5, 1\], the "
                     r"header says float32\[5\]"),
    "packed size": (lambda h, t: t["a/kernel:codes"].update(
        shape=[1], data=t["a/kernel:codes"]["data"][:1]),
                    r"leaf 'a/kernel': packed codes have uint8\[1\], "
                    "expected 2 bytes"),
    "alpha shape": (lambda h, t: t["a/kernel:alpha"].update(shape=[1]),
                    r"leaf 'a/kernel': alpha has float32\[1\]"),
    "padding bits": (_set_padding_bit,
                     "leaf 'a/kernel': The padding bits after the last code "
                     "are not zero"),
    "code outside the levels": (_linear_2_bit_codes_of_3,
                                "leaf 'a/kernel': code 3 is outside the 3 "
                                "levels of"),
    "header key missing": (lambda h, t: h["leaves"]["a/kernel"].pop("bits"),
                           r"malformed header: KeyError\('bits'\)"),
    "extra tensor": (
        lambda h, t: t.update(zzz=dict(dtype="U8", shape=[1], data=b"\0")),
        r"tensors not described by the header: \['zzz'\]"),
    "other format": (lambda h, t: h.update(format="other"),
                     r"not a blaq_jax export \(format 'other'\)"),
    "header not JSON": (lambda h, t: "{not json",
                        "corrupt blaq_jax header"),
}


def test_rebuilt_export_loads_unchanged(tmp_path, exported):
  same = _rebuild(exported[0], tmp_path / "same.safetensors",
                  lambda h, t: None)
  jax.tree.map(_assert_bit_equal, blaq_jax.load(same, exported[1]),
               blaq_jax.load(exported[0], exported[1]))


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_damaged_export_is_refused_naming_what(tmp_path, exported, damage):
  edit, match = _DAMAGE[damage]
  bad = _rebuild(exported[0], tmp_path / "bad.safetensors", edit)
  with pytest.raises(ExportError, match=match):
    blaq_jax.load(bad)


def test_export_refuses_two_leaves_of_one_name(tmp_path):
  params = {"a/b": jnp.zeros(2), "a": {"b": jnp.ones(2)}}
  with pytest.raises(ExportError, match="params: two leaves are both named "
                     "'a/b'"):
    blaq_jax.export(tmp_path / "m.safetensors", params, None)


def test_export_refuses_a_dtype_it_cannot_store(tmp_path):
  with pytest.raises(ExportError, match="Leaf 'c' has dtype complex64, which "
                     "the export format does not store"):
    blaq_jax.export(tmp_path / "m.safetensors",
                    {"c": jnp.ones(2, jnp.complex64)}, None)


def test_export_refuses_a_name_that_collides_with_a_quantized_leaf(tmp_path):
  params = {"w": jnp.array([[0.5, -0.2]]), "w:codes": jnp.zeros(2)}
  state = blaq_jax.laq(0.1, quantize=lambda p, x: path_str(p) == "w").init(
      params)
  params = blaq_jax.quantized_params(params, state)
  with pytest.raises(ExportError, match="ends in ':codes' or ':alpha'"):
    blaq_jax.export(tmp_path / "m.safetensors", params, state)


def test_load_refuses_a_template_with_two_leaves_of_one_name(exported):
  like = {"a/b": jnp.zeros(2), "a": {"b": jnp.ones(2)}}
  with pytest.raises(ExportError, match="params_like has two leaves with the "
                     "same path_str name"):
    blaq_jax.load(exported[0], like)


def test_mismatched_params_like(exported):
  path, params, _ = exported
  missing = dict(params, e={"w": jnp.zeros(2)})
  with pytest.raises(ExportError, match=r"missing from the file: \['e/w'\]"):
    blaq_jax.load(path, missing)
  extra = {k: v for k, v in params.items() if k != "c"}
  with pytest.raises(ExportError, match=r"not in params_like: \['c/w'\]"):
    blaq_jax.load(path, extra)
  shape = jax.tree.map(lambda x: x, params)
  shape["a"]["kernel"] = jnp.zeros((5, 3))
  with pytest.raises(ExportError, match=r"'a/kernel' is float32\[3, 5\] in the "
                     r"file but float32\[5, 3\]"):
    blaq_jax.load(path, shape)
  dtype = jax.tree.map(lambda x: x, params)
  dtype["b"]["scale"] = dtype["b"]["scale"].astype(jnp.float32)
  with pytest.raises(ExportError, match="'b/scale' is bfloat16"):
    blaq_jax.load(path, dtype)


def test_not_an_export(tmp_path):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  p = tmp_path / "plain.safetensors"
  p.write_bytes(safetensors.numpy.save({"x": np.zeros(3, np.float32)}))
  with pytest.raises(ExportError, match="not a blaq_jax export"):
    blaq_jax.load(p)


# ---------------------------------------------------------------- summary


def _mnist_mlp_shapes():
  sizes = (784, 2048, 2048, 2048, 10)
  return {f"dense_{i}": {
      "kernel": jax.ShapeDtypeStruct((a, b), jnp.float32),
      "bias": jax.ShapeDtypeStruct((b,), jnp.float32)}
          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


@pytest.mark.parametrize("channel_axis", [None, -1])
def test_summary_mnist_mlp_one_bit(channel_axis):
  printed = []
  s = blaq_jax.summary(_mnist_mlp_shapes(), bits=1, channel_axis=channel_axis,
                       print_fn=printed.append)
  sizes = (784, 2048, 2048, 2048, 10)
  kernels = [(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
  n_q = sum(a * b for a, b in kernels)
  n_scales = sum(b if channel_axis == -1 else 1 for _, b in kernels)
  packed_q = sum(math.ceil(a * b / 8) for a, b in kernels) + 4 * n_scales
  n_bias = sum(sizes[1:])
  assert s.quantized_params == n_q
  assert s.quantized_float32_bytes == 4 * n_q
  assert s.quantized_packed_bytes == packed_q
  assert s.packed_bytes == packed_q + 4 * n_bias
  assert s.float32_bytes == 4 * (n_q + n_bias)
  assert s.quantized_ratio == pytest.approx(4 * n_q / packed_q)
  # 1 bit + 4 bytes of scale per tensor (or per output channel).
  assert (31.99 if channel_axis is None else 31.3) < s.quantized_ratio < 32
  assert s.ratio < s.quantized_ratio
  rows = {r.name: r for r in s.rows}
  assert rows["dense_1/kernel"].bits == 1 and rows["dense_1/bias"].bits == 0
  assert rows["dense_3/kernel"].packed_bytes == math.ceil(2048 * 10 / 8) + 4 * (
      10 if channel_axis == -1 else 1)
  assert printed == [s.text] and "dense_0/kernel" in str(s)
  assert f"{s.quantized_ratio:.2f}x" in s.text


def test_summary_from_state_matches_rule():
  opt = blaq_jax.laq(0.05, bits=2, level_set="linear", quantize=_rule,
                     channel_axis=-1)
  params = _tree()
  state = opt.init(params)
  from_state = blaq_jax.summary(params, state, print_fn=None)
  from_rule = blaq_jax.summary(params, quantize=_rule, bits=2,
                               level_set="linear", channel_axis=-1,
                               print_fn=None)
  assert from_state == from_rule
  bf16 = {r.name: r for r in from_state.rows}["b/scale"]
  assert bf16.bits == 0 and bf16.packed_bytes == 2 * 7


def test_summary_refuses_params_that_lack_quantized_leaves():
  params = _tree()
  state = blaq_jax.laq(0.05, quantize=_rule).init(params)
  del params["a"]
  with pytest.raises(ValueError, match=r"summary: quantized leaves of "
                     r"opt_state are missing from params: \['a/kernel'\]"):
    blaq_jax.summary(params, state, print_fn=None)


@pytest.mark.parametrize("count", [0, 2])
def test_accessors_need_exactly_one_blaq_jax_state(count):
  params = {"w": jnp.array([[0.5, -0.2]])}
  opt = optax.chain(*[blaq_jax.laq(0.1) for _ in range(count)],
                    optax.scale(1.0))
  with pytest.raises(ValueError, match="Expected exactly one blaq_jax "
                     f"optimizer state inside opt_state, found {count}"):
    blaq_jax.latent_params(opt.init(params))


def test_schedules_refuse_a_period_below_one():
  with pytest.raises(ValueError, match="n must be a positive int, got 0"):
    blaq_jax.every_n_steps(0)


# ------------------------------------------------------ whole model state


def _bn_model(seed):
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.fc1 = nnx.Linear(6, 8, use_bias=False, rngs=rngs)
      self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
      self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.bn(self.fc1(x))))

  return Net(nnx.Rngs(seed))


def test_export_whole_nnx_state_keeps_batch_norm_statistics(tmp_path):
  """nnx.state(model) exports the running statistics; Param state alone not."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = _bn_model(0)
  optimizer = nnx.Optimizer(model, blaq_jax.laq(0.05), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (32, 6)) * 3.0 + 1.0
  y = jax.random.randint(jax.random.key(2), (32,), 0, 3)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    optimizer.update(model, nnx.grad(loss_fn)(model))

  for _ in range(3):
    step(model, optimizer)
  mean, var = np.asarray(model.bn.mean[...]), np.asarray(model.bn.var[...])
  assert np.abs(mean).max() > 0.1 and np.abs(var - 1).max() > 0.1  # trained

  path = blaq_jax.export(tmp_path / "whole.safetensors", nnx.state(model),
                         optimizer.opt_state)
  leaves = read_export(path).leaves
  assert set(leaves) == {"fc1/kernel", "fc2/kernel", "fc2/bias", "bn/bias",
                         "bn/scale", "bn/mean", "bn/var"}
  for name in ("fc1/kernel", "fc2/kernel"):
    assert leaves[name].level_set.bits == 1, name  # packed codes + scale
  for name in ("fc2/bias", "bn/bias", "bn/scale", "bn/mean", "bn/var"):
    assert leaves[name].dtype == np.float32, name  # stored as float tensors
  _assert_bit_equal(leaves["bn/mean"], mean)
  _assert_bit_equal(leaves["bn/var"], var)

  fresh = _bn_model(7)
  nnx.update(fresh, blaq_jax.load(path, nnx.state(fresh)))
  _assert_bit_equal(fresh.bn.mean[...], mean)
  _assert_bit_equal(fresh.bn.var[...], var)
  q = blaq_jax.quantized_params(nnx.state(model, nnx.Param),
                                optimizer.opt_state)
  nnx.update(model, q)  # the exact quantized weights, as the file holds
  model.eval()
  fresh.eval()
  _assert_bit_equal(fresh(x), model(x))

  # Exporting only the parameters drops the statistics: a fresh model's
  # whole state cannot be loaded from that file, and the error names them.
  params_only = blaq_jax.export(tmp_path / "params.safetensors",
                                nnx.state(model, nnx.Param),
                                optimizer.opt_state)
  with pytest.raises(ExportError, match=r"missing from the file: "
                     r"\['bn/mean', 'bn/var'\]"):
    blaq_jax.load(params_only, nnx.state(_bn_model(3)))


# ---------------------------------------------------------------- inference


def test_mnist_eval_from_export_matches_in_memory(tmp_path, shared_data_dir):
  """Train a small MLP a few steps, export, reload into a fresh model."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from experiments.data import load_mnist  # pylint: disable=g-import-not-at-top
  from experiments.models import create_model  # pylint: disable=g-import-not-at-top

  splits = load_mnist(shared_data_dir)
  x_train, y_train = splits["train"][0][:2048], splits["train"][1][:2048]
  x_test, y_test = splits["test"][0][:2000], splits["test"][1][:2000]

  model = create_model("mlp", num_classes=10, rngs=nnx.Rngs(0),
                       hidden=(64, 64))
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = blaq_jax.laq(1e-2, bits=1)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, rest, opt_state, x, y):
    def loss_fn(p):
      m = nnx.merge(graphdef, p, nnx.as_pure(rest))
      logits = m(x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, nnx.state(m, nnx.Not(nnx.Param))
    (_, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state

  for i in range(16):
    sl = slice(128 * i, 128 * (i + 1))
    params, rest, opt_state = step(params, rest, opt_state, x_train[sl],
                                   y_train[sl])

  def evaluate(m):
    m.eval()
    logits = np.asarray(jax.jit(lambda mm, x: mm(x))(m, x_test))
    return logits, float(np.mean(logits.argmax(-1) == y_test))

  nnx.update(model, params, rest)
  logits_mem, acc_mem = evaluate(model)
  nnx.update(model, blaq_jax.quantized_params(params, opt_state))
  logits_q, acc_q = evaluate(model)
  assert acc_mem > 0.5  # it learned something: the check is not vacuous

  # Export everything the model needs (params and batch statistics).
  path = blaq_jax.export(tmp_path / "mlp.safetensors", nnx.state(model),
                         opt_state, metadata={"accuracy": acc_q})
  fresh = create_model("mlp", num_classes=10, rngs=nnx.Rngs(1),
                       hidden=(64, 64))
  nnx.update(fresh, blaq_jax.load(path, nnx.state(fresh)))
  logits_exp, acc_exp = evaluate(fresh)
  np.testing.assert_array_equal(logits_exp, logits_q)
  assert acc_exp == acc_q == acc_mem
  s = blaq_jax.summary(nnx.state(fresh, nnx.Param), opt_state, print_fn=None)
  assert s.quantized_params == 784 * 64 + 64 * 64 + 64 * 10
  assert _payload_bytes(path) < s.float32_bytes / 4
