"""Tests of experiments.data: originals, checksums, splits, grain loader."""

import gzip
import importlib.util
import pathlib
import shutil

import numpy as np
import pytest

from experiments import data


def _batches(loader):
  return [(b["image"].copy(), b["label"].copy()) for b in loader]


def _toy(n=20, shape=(6, 6, 1)):
  x = np.arange(n * int(np.prod(shape)), dtype=np.float32).reshape(n, *shape)
  return x / x.max(), np.arange(n, dtype=np.int32)


# ----------------------------------------------------------- originals --

@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_split_sizes_and_ranges(shared_data_dir, name):
  splits = data.load_mnist(shared_data_dir, name)
  sizes = {k: len(v[1]) for k, v in splits.items()}
  assert sizes == {"train": 50_000, "validation": 10_000, "test": 10_000}
  for x, y in splits.values():
    assert x.dtype == np.float32 and x.shape[1:] == (28, 28, 1)
    assert y.dtype == np.int32 and x.shape[0] == y.shape[0]
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    assert not x.flags.writeable  # Cached and shared between callers.
  # Validation is the tail of the official training file, in file order.
  raw = data._read_idx(shared_data_dir / name / "train-labels-idx1-ubyte.gz")
  np.testing.assert_array_equal(splits["validation"][1], raw[50_000:])
  np.testing.assert_array_equal(splits["train"][1], raw[:50_000])
  assert data.load_mnist(shared_data_dir, name) is splits


def test_mnist_and_fashion_differ(shared_data_dir):
  m = data.load_mnist(shared_data_dir, "mnist")["test"][0]
  f = data.load_mnist(shared_data_dir, "fashion_mnist")["test"][0]
  assert not np.array_equal(m[:10], f[:10])


def test_checksums_match_shared_sums(shared_data_dir):
  sums = (shared_data_dir / "SHA256SUMS").read_text().split("\n")
  listed = dict(reversed(line.split()) for line in sums if line.strip())
  for name, files in data.CHECKSUMS.items():
    for fname, digest in files.items():
      assert listed[f"{name}/{fname}"] == digest


def _copy_mnist(shared_data_dir, tmp_path):
  # The large image file is linked, the small label files are copied.
  dest = tmp_path / "mnist"
  dest.mkdir()
  for fname in data.CHECKSUMS["mnist"]:
    src = shared_data_dir / "mnist" / fname
    if "images" in fname:
      (dest / fname).symlink_to(src)
    else:
      shutil.copy(src, dest / fname)
  return dest


def test_corrupted_file_names_file_and_checksum(shared_data_dir, tmp_path):
  dest = _copy_mnist(shared_data_dir, tmp_path)
  target = dest / "t10k-labels-idx1-ubyte.gz"
  raw = bytearray(target.read_bytes())
  raw[100] ^= 0xFF
  target.write_bytes(bytes(raw))
  expected = data.CHECKSUMS["mnist"]["t10k-labels-idx1-ubyte.gz"]
  with pytest.raises(ValueError) as err:
    data.load_mnist(tmp_path, "mnist")
  msg = str(err.value)
  assert str(target) in msg and expected in msg
  assert data.sha256(target) in msg


def test_missing_file_names_file_and_folder(shared_data_dir, tmp_path):
  dest = _copy_mnist(shared_data_dir, tmp_path)
  (dest / "train-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError) as err:
    data.load_mnist(tmp_path, "mnist")
  assert "train-labels-idx1-ubyte.gz" in str(err.value)
  assert str(dest) in str(err.value)
  # The hint names the flag that exists (--config.data_dir) and the variable.
  assert "point --config.data_dir" in str(err.value)
  assert "or $BLAQ_DATA_DIR at the folder" in str(err.value)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
    data.load_mnist(tmp_path / "empty", "fashion_mnist")


def test_data_dir_may_be_the_dataset_folder(shared_data_dir):
  a = data.load_mnist(shared_data_dir / "mnist", "mnist")["test"]
  b = data.load_mnist(shared_data_dir, "mnist")["test"]
  assert a is b  # One cache entry for both spellings of the folder.


def test_default_data_dir_env(monkeypatch, tmp_path):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  assert data.default_data_dir() == tmp_path
  monkeypatch.delenv(data.DATA_DIR_ENV)
  repo = pathlib.Path(data.__file__).resolve().parents[1]
  assert data.default_data_dir() == repo.parent / "shared" / "data"


def test_bad_name_and_bad_idx(tmp_path):
  with pytest.raises(ValueError, match="fashion_mnist"):
    data.load_mnist(tmp_path, "kmnist")
  bad = tmp_path / "bad.gz"
  with gzip.open(bad, "wb") as f:
    f.write(b"\x00\x00\x0d\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
    data._read_idx(bad)
  short = tmp_path / "short.gz"
  with gzip.open(short, "wb") as f:
    f.write(b"\x00\x00\x08\x01\x00\x00\x00\x05" + b"\x01" * 3)
  with pytest.raises(ValueError, match=r"shape \(5,\)"):
    data._read_idx(short)


def test_get_dataset_mnist(shared_data_dir):
  splits, info = data.get_dataset("mnist", shared_data_dir)
  assert info == data.DatasetInfo("mnist", 10, (28, 28, 1), None)
  assert splits is data.load_mnist(shared_data_dir)
  with pytest.raises(TypeError, match="unexpected options"):
    data.get_dataset("mnist", shared_data_dir, n_train=3)


# ----------------------------------------------------------- synthetic --

def test_synthetic_is_reproducible_and_learnable():
  a = data.synthetic((8, 8, 3), 10, n_train=500, n_eval=200, seed=3)
  b = data.synthetic((8, 8, 3), 10, n_train=500, n_eval=200, seed=3)
  c = data.synthetic((8, 8, 3), 10, n_train=500, n_eval=200, seed=4)
  np.testing.assert_array_equal(a["train"][0], b["train"][0])
  assert not np.array_equal(a["train"][0], c["train"][0])
  (x, y), (xt, yt) = a["train"], a["test"]
  assert x.min() >= 0 and x.max() <= 1 and x.dtype == np.float32
  # A nearest-class-mean classifier fit on train generalises to test.
  means = np.stack([x[y == k].mean(0) for k in range(10)]).reshape(10, -1)
  dist = ((xt.reshape(len(xt), 1, -1) - means[None]) ** 2).sum(-1)
  assert (dist.argmin(1) == yt).mean() > 0.9
  assert (a["train"][1] == 0).mean() < 0.3


def test_get_dataset_synthetic_options():
  splits, info = data.get_dataset("synthetic_imagenet", n_train=6, n_eval=2,
                                  image_shape=(16, 16, 3))
  assert info == data.DatasetInfo("synthetic_imagenet", 1000, (16, 16, 3),
                                  "imagenet")
  assert splits["train"][0].shape == (6, 16, 16, 3)
  with pytest.raises(TypeError, match="unexpected options"):
    data.get_dataset("synthetic_cifar10", n_train=4, n_eval=2, colour=True)
  with pytest.raises(ValueError, match="shape"):
    data.synthetic((8, 8), 10, 4, 4)


# -------------------------------------------------------------- loader --

def test_loader_same_seed_same_batches_each_epoch_a_permutation():
  x, y = _toy(20)
  kw = dict(batch_size=5, seed=7, num_epochs=2, shard_by_process=False)
  first = _batches(data.make_loader(x, y, **kw))
  again = _batches(data.make_loader(x, y, **kw))
  for (xa, ya), (xb, yb) in zip(first, again):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  epoch0 = np.concatenate([b[1] for b in first[:4]])
  epoch1 = np.concatenate([b[1] for b in first[4:]])
  assert sorted(epoch0) == list(range(20)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)
  # Images travel with their labels.
  for xb, yb in first:
    np.testing.assert_array_equal(xb, x[yb])
  other = np.concatenate([b[1] for b in _batches(
      data.make_loader(x, y, **{**kw, "seed": 8}))[:4]])
  assert not np.array_equal(epoch0, other)
  plain = np.concatenate([b["label"] for b in data.make_loader(
      x, y, batch_size=5, seed=0, shuffle=False, shard_by_process=False)])
  np.testing.assert_array_equal(plain, np.arange(20))


def test_loader_drop_remainder():
  x, y = _toy(10)
  dropped = data.make_loader(x, y, batch_size=4, seed=0,
                             shard_by_process=False)
  assert [len(b["label"]) for b in dropped] == [4, 4]
  assert len(dropped) == dropped.batches_per_epoch == 2
  kept = data.make_loader(x, y, batch_size=4, seed=0, drop_remainder=False,
                          shard_by_process=False)
  labels = [b["label"] for b in kept]
  assert [len(b) for b in labels] == [4, 4, 2]
  assert sorted(np.concatenate(labels)) == list(range(10))
  with pytest.raises(ValueError, match="give no batch"):
    data.make_loader(x, y, batch_size=11, seed=0, shard_by_process=False)


def test_loader_process_sharding():
  x, y = _toy(23)
  shards = []
  for p in range(3):
    loader = data.make_loader(x, y, batch_size=3, seed=5, num_epochs=1,
                              drop_remainder=False, process_index=p,
                              process_count=3)
    shards.append(np.concatenate([b["label"] for b in loader]))
  # Equal shares (23 // 3 = 7 each), disjoint, from one common permutation.
  assert [len(s) for s in shards] == [7, 7, 7]
  union = np.concatenate(shards)
  assert len(set(union.tolist())) == 21
  with pytest.raises(ValueError, match="process_index 3"):
    data.make_loader(x, y, batch_size=3, seed=0, process_index=3,
                     process_count=3)
  # The default is this JAX process: a single-process run sees everything.
  single = data.make_loader(x, y, batch_size=23, seed=5)
  assert sorted(next(iter(single))["label"]) == list(range(23))


def test_loader_resume_from_start_index():
  x, y = _toy(24, (8, 8, 3))
  kw = dict(batch_size=4, seed=11, num_epochs=3, augment="cifar",
            shard_by_process=False)
  full = _batches(data.make_loader(x, y, **kw))
  assert len(full) == 18
  for start in (4, 6, 13):
    resumed = data.make_loader(x, y, start_index=start, **kw)
    assert len(resumed) == 18 - start
    rest = _batches(resumed)
    assert len(rest) == 18 - start
    for (xa, ya), (xb, yb) in zip(full[start:], rest):
      np.testing.assert_array_equal(ya, yb)
      np.testing.assert_array_equal(xa, xb)


def test_loader_unbounded_and_threads():
  x, y = _toy(8)
  loader = data.make_loader(x, y, batch_size=4, seed=0, num_epochs=None,
                            shard_by_process=False)
  with pytest.raises(TypeError, match="unbounded"):
    len(loader)
  it = iter(loader)
  assert len([next(it) for _ in range(7)]) == 7
  threaded = data.make_loader(x, y, batch_size=4, seed=0, num_epochs=2,
                              num_threads=2, shard_by_process=False)
  plain = data.make_loader(x, y, batch_size=4, seed=0, num_epochs=2,
                           shard_by_process=False)
  for a, b in zip(_batches(threaded), _batches(plain), strict=True):
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])


def test_loader_uint8_and_argument_errors():
  x = np.full((4, 2, 2, 1), 255, np.uint8)
  batch = next(iter(data.make_loader(x, np.zeros(4, np.int32), batch_size=2,
                                     seed=0, shard_by_process=False)))
  assert batch["image"].dtype == np.float32 and batch["image"].max() == 1.0
  with pytest.raises(ValueError, match="unknown augment 'flip'"):
    data.make_loader(x, np.zeros(4), batch_size=2, seed=0, augment="flip")
  with pytest.raises(ValueError, match="x has 4 examples but y has 3"):
    data.make_loader(x, np.zeros(3), batch_size=2, seed=0)


def test_cifar_augmentation_is_a_padded_crop_or_its_mirror():
  rng = np.random.default_rng(0)
  x = rng.random((16, 6, 6, 2)).astype(np.float32)
  out = data.augment_cifar(x, np.random.default_rng(1), pad=2)
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  flips = 0
  for i in range(16):
    crops = {(dy, dx, f): (padded[i, dy:dy + 6, dx:dx + 6, :][:, ::-1]
                           if f else padded[i, dy:dy + 6, dx:dx + 6, :])
             for dy in range(5) for dx in range(5) for f in (0, 1)}
    hits = [k for k, c in crops.items() if np.array_equal(c, out[i])]
    assert hits, i
    flips += hits[0][2]
  assert 0 < flips < 16
  again = data.augment_cifar(x, np.random.default_rng(1), pad=2)
  np.testing.assert_array_equal(out, again)


def test_imagenet_augmentation_resamples_the_image():
  x = np.arange(2 * 16 * 16 * 3, dtype=np.float32).reshape(2, 16, 16, 3)
  out = data.augment_imagenet(x, np.random.default_rng(0))
  assert out.shape == x.shape
  for i in range(2):
    assert set(np.unique(out[i])) <= set(np.unique(x[i]))
  # Full-scale crops at aspect 1 reproduce the image up to a flip.
  same = data.augment_imagenet(x, np.random.default_rng(0), scale=(1, 1),
                               ratio=(1, 1))
  for i in range(2):
    assert (np.array_equal(same[i], x[i])
            or np.array_equal(same[i], x[i][:, ::-1]))


def test_loader_augmentation_depends_on_epoch_and_batch():
  x = np.random.default_rng(0).random((8, 8, 8, 3)).astype(np.float32)
  y = np.zeros(8, np.int32)
  loader = data.make_loader(x, y, batch_size=8, seed=1, num_epochs=2,
                            shuffle=False, augment="cifar",
                            shard_by_process=False)
  e0, e1 = _batches(loader)
  assert not np.array_equal(e0[0], e1[0])
  np.testing.assert_array_equal(e0[0], _batches(loader)[0][0])


# ---------------------------------------------------------------- TFDS --

def test_lazy_tfds_views_resize_slice_and_load():
  # A stand-in for tfds.data_source: random access to decoded records of
  # different image sizes.
  rng = np.random.default_rng(0)
  source = [{"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
             "label": k} for k, (h, w) in enumerate(
                 [(10, 14), (12, 8), (8, 8), (20, 9), (9, 11), (16, 16)])]
  images, labels = data._ResizedImages(source, 8), data._Labels(source)
  assert len(images) == 6 and images[0].shape == (8, 8, 3)
  assert images[0].dtype == np.float32 and 0 <= images[0].min()
  np.testing.assert_allclose(images[2], source[2]["image"] / 255.0,
                             atol=1e-6)  # Already 8x8: unchanged.
  tail_x, tail_y = images[2:], labels[2:]
  assert len(tail_x) == 4
  np.testing.assert_array_equal(tail_x[0], images[2])
  np.testing.assert_array_equal(tail_y[np.array([0, 3])], [2, 5])
  loader = data.make_loader(tail_x, tail_y, batch_size=2, seed=0,
                            shard_by_process=False)
  got = list(loader)
  assert sorted(np.concatenate([b["label"] for b in got])) == [2, 3, 4, 5]
  for b in got:
    for img, k in zip(b["image"], b["label"]):
      np.testing.assert_array_equal(img, images[k])


_HAVE_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
_HAVE_TF = importlib.util.find_spec("tensorflow") is not None


@pytest.mark.skipif(_HAVE_TFDS, reason="tensorflow_datasets is installed")
def test_tfds_missing_names_the_extra():
  with pytest.raises(ImportError, match=r"pip install 'blaq_jax\[tfds\]'"):
    data.load_tfds("cifar10")
  with pytest.raises(ImportError, match="blaq_jax"):
    data.get_dataset("svhn_cropped")


@pytest.mark.skipif(
    not (_HAVE_TFDS and _HAVE_TF),
    reason="TFDS path needs the optional extra blaq_jax[tfds] "
    "(tensorflow-datasets and tensorflow), not installed here")
def test_tfds_prepares_mnist_offline_from_originals(shared_data_dir,
                                                    tmp_path):
  splits = data.load_tfds("mnist", data_dir=tmp_path,
                          manual_dir=shared_data_dir / "mnist")
  ours = data.load_mnist(shared_data_dir)
  assert {k: len(v[1]) for k, v in splits.items()} == {
      k: len(v[1]) for k, v in ours.items()}

  def examples(*parts):
    # TFDS stores examples in its own order: compare as multisets.
    return sorted((int(label), hash(img.tobytes())) for x, y in parts
                  for img, label in zip(x, y))

  assert examples(splits["test"]) == examples(ours["test"])
  assert (examples(splits["train"], splits["validation"])
          == examples(ours["train"], ours["validation"]))
