"""Datasets and the grain input pipeline of the experiments.

Three sources, all returning ``{"train": (x, y), "validation": (x, y),
"test": (x, y)}`` with NHWC images ``x`` and int32 labels ``y``:

* :func:`load_mnist`: MNIST / Fashion-MNIST parsed with numpy from the
  original ``*-idx?-ubyte.gz`` files, each verified against the SHA-256 that
  TFDS registers for it. The paper's split: the first 50k training images
  train, the last 10k validate, the official 10k test.
* :func:`load_tfds`: any TFDS dataset (``cifar10``, ``svhn_cropped``,
  ``imagenet2012``, ...), with the optional ``tensorflow_datasets`` extra.
* :func:`synthetic`: random images with learnable labels for smoke runs of
  CIFAR-, SVHN- or ImageNet-shaped configurations.

:func:`make_loader` turns arrays into per-process batches with grain: a
seeded shuffle per epoch, sharding by JAX process, batching, and the standard
augmentation (CIFAR: 4-pixel zero padding, random crop and horizontal flip;
ImageNet: random-resized crop and flip), deterministic given
``(seed, epoch, batch index)`` so that reruns and resumed runs reproduce.

Example:
  >>> import numpy as np
  >>> from experiments.data import make_loader, synthetic
  >>> splits = synthetic((8, 8, 3), num_classes=4, n_train=64, n_eval=16)
  >>> x, y = splits["train"]
  >>> loader = make_loader(x, y, batch_size=16, seed=0, augment="cifar")
  >>> batch = next(iter(loader))
  >>> batch["image"].shape, batch["label"].shape, len(loader)
  ((16, 8, 8, 3), (16,), 4)
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import pathlib
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

DATA_DIR_ENV = "BLAQ_DATA_DIR"

# The SHA-256 checksums TFDS registers for the original files
# (tensorflow_datasets/image_classification/{mnist,fashion_mnist} checksums).
CHECKSUMS = {
    "mnist": {
        "train-images-idx3-ubyte.gz":
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz":
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz":
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz":
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz":
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz":
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz":
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz":
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

# Size of the paper's MNIST validation split (taken from the end of train).
MNIST_VALIDATION = 10_000

Splits = dict  # {"train" | "validation" | "test": (x, y)}


def default_data_dir() -> pathlib.Path:
  """``$BLAQ_DATA_DIR`` if set, else ``shared/data`` beside the checkout."""
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def sha256(path: Union[str, os.PathLike]) -> str:
  """Hex SHA-256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _find_original(data_dir: pathlib.Path, name: str,
                   fname: str) -> pathlib.Path:
  # Either <data_dir>/<name>/<file> or data_dir pointing at <name> itself.
  candidates = [data_dir / name / fname, data_dir / fname]
  if data_dir.name == name:
    candidates = candidates[::-1]
  for path in candidates:
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"{name}: original file '{fname}' not found; searched "
      f"{', '.join(str(p.parent) for p in candidates)}. Put the original "
      f"{name} files there, or point --config.data_dir (the training "
      f"application's flag) or ${DATA_DIR_ENV} at the folder holding them.")


def verify_file(path: pathlib.Path, expected: str) -> None:
  """Raises ValueError naming ``path`` if its SHA-256 is not ``expected``."""
  actual = sha256(path)
  if actual != expected:
    raise ValueError(
        f"Checksum mismatch for '{path}': expected SHA-256 {expected}, got "
        f"{actual}. The file is corrupted or not the original; download it "
        "again.")


def _read_idx(path: pathlib.Path) -> np.ndarray:
  """Parses a gzipped IDX file (big-endian header, then uint8 data)."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise ValueError(f"'{path}' is not an unsigned-byte IDX file.")
  ndim = raw[3]
  dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim,
                                             offset=4))
  data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise ValueError(f"'{path}': header says shape {dims} but holds "
                     f"{data.size} values.")
  return data.reshape(dims)


@functools.lru_cache(maxsize=4)
def _load_mnist_cached(data_dir: str, name: str) -> Splits:
  files = {}
  for fname, expected in CHECKSUMS[name].items():
    path = _find_original(pathlib.Path(data_dir), name, fname)
    verify_file(path, expected)
    files[fname] = _read_idx(path)

  def images(fname):
    x = files[fname].astype(np.float32)[..., None] / np.float32(255.0)
    return x

  def labels(fname):
    return files[fname].astype(np.int32)

  x_train, y_train = (images("train-images-idx3-ubyte.gz"),
                      labels("train-labels-idx1-ubyte.gz"))
  cut = len(x_train) - MNIST_VALIDATION
  splits = {
      "train": (x_train[:cut], y_train[:cut]),
      "validation": (x_train[cut:], y_train[cut:]),
      "test": (images("t10k-images-idx3-ubyte.gz"),
               labels("t10k-labels-idx1-ubyte.gz")),
  }
  for x, y in splits.values():  # Shared by every caller: keep it read-only.
    x.flags.writeable = False
    y.flags.writeable = False
  return splits


def load_mnist(data_dir=None, name: str = "mnist") -> Splits:
  """MNIST or Fashion-MNIST from the verified original files.

  Args:
    data_dir: folder holding ``<name>/*-ubyte.gz`` (or the files
      themselves); default :func:`default_data_dir`.
    name: ``"mnist"`` or ``"fashion_mnist"``.

  Returns:
    ``{"train", "validation", "test"}`` -> ``(x, y)``: ``x`` float32
    ``[N, 28, 28, 1]`` in ``[0, 1]``, ``y`` int32; 50k / 10k / 10k. The arrays
    are cached in-process and read-only.

  Raises:
    FileNotFoundError: a file is missing (names it and the folders searched).
    ValueError: a file's SHA-256 differs from the registered one (names the
      file, the expected and the actual checksum).
  """
  if name not in CHECKSUMS:
    raise ValueError(f"load_mnist: name must be one of {sorted(CHECKSUMS)}, "
                     f"got {name!r}.")
  data_dir = pathlib.Path(data_dir or default_data_dir()).expanduser()
  if (data_dir / name).is_dir():  # One cache entry for both spellings.
    data_dir = data_dir / name
  return _load_mnist_cached(str(data_dir.resolve()), name)


def synthetic(shape: Sequence[int], num_classes: int, n_train: int,
              n_eval: int, seed: int = 0) -> Splits:
  r"""Random images whose labels a network can learn.

  Each class has a random low-resolution prototype :math:`p_c` (at most 8x8,
  upsampled to ``shape``); an image of class :math:`c` is
  :math:`\mathrm{clip}(0.5 + 0.25 p_c + 0.15 \epsilon, 0, 1)` with Gaussian
  noise :math:`\epsilon`, so the classes are separable but not trivially so.

  Args:
    shape: ``(H, W, C)`` of the images.
    num_classes: number of classes.
    n_train: training examples (validation and test get ``n_eval`` each).
    n_eval: validation and test examples.
    seed: the generator seed (same seed, same data).

  Returns:
    The splits dict, ``x`` float32 in ``[0, 1]``, ``y`` int32.

  Examples:
    >>> s = synthetic((4, 4, 1), num_classes=3, n_train=10, n_eval=2)
    >>> s["train"][0].shape, s["validation"][1].dtype
    ((10, 4, 4, 1), dtype('int32'))
  """
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"synthetic: shape must be (H, W, C), got {shape}.")
  if num_classes < 2 or n_train < 1 or n_eval < 1:
    raise ValueError("synthetic: need num_classes >= 2 and positive sizes, "
                     f"got {num_classes}, {n_train}, {n_eval}.")
  h, w, c = shape
  rng = np.random.default_rng(seed)
  ph, pw = min(h, 8), min(w, 8)
  protos = rng.standard_normal((num_classes, ph, pw, c)).astype(np.float32)
  rows = np.arange(h) * ph // h
  cols = np.arange(w) * pw // w
  protos = protos[:, rows][:, :, cols]

  def make(n):
    y = rng.integers(0, num_classes, n).astype(np.int32)
    noise = rng.standard_normal((n, h, w, c), dtype=np.float32)
    x = np.clip(0.5 + 0.25 * protos[y] + 0.15 * noise, 0.0, 1.0)
    return x.astype(np.float32), y

  return {"train": make(n_train), "validation": make(n_eval),
          "test": make(n_eval)}


# ---------------------------------------------------------------- TFDS --

_TFDS_SPLITS = {
    # The paper's CIFAR-10 split: 45k train / 5k validation / 10k test.
    "cifar10": ("train[:45000]", "train[45000:]", "test"),
    "cifar100": ("train[:45000]", "train[45000:]", "test"),
    "svhn_cropped": ("train[:-6000]", "train[-6000:]", "test"),
    # The papers report ImageNet's validation set as their test set.
    "imagenet2012": ("train", "validation", "validation"),
    "mnist": ("train[:50000]", "train[50000:]", "test"),
    "fashion_mnist": ("train[:50000]", "train[50000:]", "test"),
}

_AUGMENT = {"cifar10": "cifar", "cifar100": "cifar", "imagenet2012": "imagenet"}


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "TFDS datasets need the optional extra: pip install "
        "'blaq_jax[tfds]' (tensorflow-datasets and tensorflow). MNIST and "
        "Fashion-MNIST load without it from the original files "
        "(get_dataset('mnist')).") from e
  return tfds


class _LazyView:
  """Random-access view of a TFDS data source; slicing gives a sub-view."""

  def __init__(self, source, indices=None):
    self.source = source
    self.indices = (np.arange(len(source)) if indices is None
                    else np.asarray(indices))

  def __len__(self):
    return len(self.indices)

  def _sub(self, key):
    view = object.__new__(type(self))
    view.__dict__.update(self.__dict__)
    view.indices = self.indices[key]
    return view

  def _record(self, i):
    return self.source[int(self.indices[int(i)])]


class _ResizedImages(_LazyView):
  """Float32 images of one size, decoded lazily (ImageNet does not fit in
  memory): the shorter side is resized to ``size``, the centre square kept."""

  def __init__(self, source, size: int, indices=None):
    super().__init__(source, indices)
    self.size = size

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self._sub(i)
    from PIL import Image  # pylint: disable=g-import-not-at-top
    img = Image.fromarray(np.asarray(self._record(i)["image"]))
    scale = self.size / min(img.size)
    img = img.resize((max(self.size, round(img.size[0] * scale)),
                      max(self.size, round(img.size[1] * scale))),
                     Image.BILINEAR)
    left = (img.size[0] - self.size) // 2
    top = (img.size[1] - self.size) // 2
    img = img.crop((left, top, left + self.size, top + self.size))
    return np.asarray(img, np.float32) / np.float32(255.0)


class _Labels(_LazyView):
  """Labels of a TFDS data source (an int32 array for index arrays)."""

  def __getitem__(self, idx):
    if isinstance(idx, slice):
      return self._sub(idx)
    idx = np.atleast_1d(idx)
    return np.asarray([self._record(i)["label"] for i in idx], np.int32)


def load_tfds(name: str, data_dir=None, split_spec=None, *,
              in_memory: Optional[bool] = None, image_size: int = 224,
              manual_dir=None) -> Splits:
  """A TFDS dataset as the splits dict (needs ``blaq_jax[tfds]``).

  Small datasets are loaded into memory (``tfds.load(..., batch_size=-1)``,
  images float32 in ``[0, 1]``). Large ones (``imagenet2012`` by default, or
  ``in_memory=False``) are read lazily through ``tfds.data_source`` (the
  dataset must be prepared in the ``array_record`` format), each image resized
  to ``image_size`` and centre-cropped.

  MNIST and Fashion-MNIST can be prepared offline from the original files:
  ``manual_dir`` (default ``<default_data_dir()>/<name>``) is passed as
  ``tfds.download.DownloadConfig(manual_dir=...)``; TFDS finds the files there
  by name and verifies their registered checksums itself.

  Args:
    name: the TFDS name, e.g. ``"cifar10"``.
    data_dir: TFDS ``data_dir`` (``None``: TFDS's default).
    split_spec: ``(train, validation, test)`` TFDS split strings; default the
      papers' split for known names (``cifar10``: 45k/5k/10k), else
      ``train`` / ``validation`` (or ``test``) / ``test``.
    in_memory: load into numpy arrays; default all but ``imagenet2012``.
    image_size: the square size of lazily decoded images.
    manual_dir: where the MNIST originals are, for offline preparation.

  Returns:
    The splits dict.
  """
  tfds = _import_tfds()
  if in_memory is None:
    in_memory = name != "imagenet2012"
  # tfds.data_source needs random access: the array_record file format.
  builder = tfds.builder(name, data_dir=data_dir, **(
      {} if in_memory else {"file_format": "array_record"}))
  if name in CHECKSUMS:
    manual = pathlib.Path(manual_dir or default_data_dir() / name)
    config = tfds.download.DownloadConfig(manual_dir=str(manual))
  else:
    config = None
  builder.download_and_prepare(download_config=config)
  if split_spec is None:
    split_spec = _TFDS_SPLITS.get(name)
  if split_spec is None:
    available = set(builder.info.splits)
    split_spec = ("train", "validation" if "validation" in available
                  else "test", "test")
  if len(split_spec) != 3:
    raise ValueError("load_tfds: split_spec must be (train, validation, "
                     f"test) split strings, got {split_spec!r}.")
  splits = {}
  for key, spec in zip(("train", "validation", "test"), split_spec):
    if in_memory:
      data = tfds.as_numpy(builder.as_dataset(split=spec, batch_size=-1))
      x = data["image"].astype(np.float32) / np.float32(255.0)
      splits[key] = (x, data["label"].astype(np.int32))
    else:
      source = tfds.data_source(name, split=spec, data_dir=data_dir)
      splits[key] = (_ResizedImages(source, image_size), _Labels(source))
  return splits


# ------------------------------------------------------------ dispatch --

@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a training run needs to know about a dataset.

  Attributes:
    name: the dataset name.
    num_classes: number of classes.
    image_shape: ``(H, W, C)``.
    augment: ``"cifar"``, ``"imagenet"`` or ``None`` (see
      :func:`make_loader`).
  """
  name: str
  num_classes: int
  image_shape: tuple
  augment: Optional[str]


_SYNTHETIC = {
    # name: (image shape, classes, augmentation, default n_train, n_eval)
    "synthetic_cifar10": ((32, 32, 3), 10, "cifar", 2048, 512),
    "synthetic_svhn": ((32, 32, 3), 10, None, 2048, 512),
    "synthetic_imagenet": ((64, 64, 3), 1000, "imagenet", 4096, 1024),
}


def get_dataset(name: str, data_dir=None, **kw) -> tuple[Splits, DatasetInfo]:
  """Loads dataset ``name`` and describes it.

  Args:
    name: ``"mnist"`` / ``"fashion_mnist"`` (the verified originals),
      ``"synthetic_cifar10"``, ``"synthetic_svhn"``, ``"synthetic_imagenet"``
      (random learnable data; options ``n_train``, ``n_eval``, ``seed``,
      ``image_shape``, ``num_classes``), or any TFDS name (:func:`load_tfds`,
      options passed on).
    data_dir: the data folder (originals) or TFDS ``data_dir``.
    **kw: options of the chosen loader.

  Returns:
    ``(splits, info)``.

  Examples:
    >>> splits, info = get_dataset("synthetic_cifar10", n_train=8, n_eval=4)
    >>> info.num_classes, info.image_shape, info.augment
    (10, (32, 32, 3), 'cifar')
  """
  if name in CHECKSUMS:
    if kw:
      raise TypeError(f"get_dataset({name!r}): unexpected options "
                      f"{sorted(kw)}.")
    splits = load_mnist(data_dir, name)
    return splits, DatasetInfo(name, 10, (28, 28, 1), None)
  if name in _SYNTHETIC:
    shape, classes, augment, n_train, n_eval = _SYNTHETIC[name]
    shape = tuple(kw.pop("image_shape", shape))
    classes = kw.pop("num_classes", classes)
    splits = synthetic(shape, classes, kw.pop("n_train", n_train),
                       kw.pop("n_eval", n_eval), seed=kw.pop("seed", 0))
    if kw:
      raise TypeError(f"get_dataset({name!r}): unexpected options "
                      f"{sorted(kw)}.")
    return splits, DatasetInfo(name, classes, shape, augment)
  splits = load_tfds(name, data_dir, **kw)
  tfds = _import_tfds()
  features = tfds.builder(name, data_dir=data_dir).info.features
  x = splits["train"][0]
  shape = tuple(np.shape(x[0]))
  return splits, DatasetInfo(name, int(features["label"].num_classes), shape,
                             _AUGMENT.get(name))


# -------------------------------------------------------- augmentation --

def augment_cifar(images: np.ndarray, rng: np.random.Generator,
                  pad: int = 4) -> np.ndarray:
  """Zero-pad by ``pad``, crop back at a random offset, flip half of them.

  Examples:
    >>> import numpy as np
    >>> x = np.ones((2, 8, 8, 3), np.float32)
    >>> augment_cifar(x, np.random.default_rng(0)).shape
    (2, 8, 8, 3)
  """
  n, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy = rng.integers(0, 2 * pad + 1, n)
  dx = rng.integers(0, 2 * pad + 1, n)
  flip = rng.random(n) < 0.5
  rows = dy[:, None] + np.arange(h)[None, :]                       # [n, h]
  cols = dx[:, None] + np.arange(w)[None, :]                       # [n, w]
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(n)[:, None, None], rows[:, :, None],
                cols[:, None, :]]


def augment_imagenet(images: np.ndarray, rng: np.random.Generator,
                     scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Random-resized crop (Inception style) back to the input size, and flip.

  A crop of area ``s * H * W`` (``s`` uniform in ``scale``) and aspect ratio
  log-uniform in ``ratio`` is resampled with nearest-neighbour indexing.

  Examples:
    >>> import numpy as np
    >>> x = np.ones((2, 16, 16, 3), np.float32)
    >>> augment_imagenet(x, np.random.default_rng(0)).shape
    (2, 16, 16, 3)
  """
  n, h, w, _ = images.shape
  area = rng.uniform(*scale, n) * h * w
  aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), n))
  ch = np.clip(np.round(np.sqrt(area / aspect)), 1, h).astype(int)
  cw = np.clip(np.round(np.sqrt(area * aspect)), 1, w).astype(int)
  top = (rng.random(n) * (h - ch + 1)).astype(int)
  left = (rng.random(n) * (w - cw + 1)).astype(int)
  flip = rng.random(n) < 0.5
  rows = top[:, None] + (np.arange(h)[None, :] * ch[:, None]) // h
  cols = left[:, None] + (np.arange(w)[None, :] * cw[:, None]) // w
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return images[np.arange(n)[:, None, None], rows[:, :, None],
                cols[:, None, :]]


AUGMENTATIONS = {"cifar": augment_cifar, "imagenet": augment_imagenet}

# ---------------------------------------------------------------- loader --


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _gather(x, idx: np.ndarray) -> np.ndarray:
  if isinstance(x, np.ndarray):
    out = x[idx]
  else:
    out = np.stack([np.asarray(x[int(i)]) for i in idx])
  if out.dtype == np.uint8:
    out = out.astype(np.float32) / np.float32(255.0)
  return out


class Loader:
  """Iterable of ``{"image", "label"}`` batches (see :func:`make_loader`).

  Attributes:
    batches_per_epoch: batches this process yields per epoch.
    num_epochs: epochs (``None``: unbounded).
    start_index: batches skipped at the start (already consumed).
  """

  def __init__(self, x, y, *, batch_size, seed, shuffle, drop_remainder,
               num_epochs, augment, process_index, process_count,
               start_index, num_threads):
    self.x, self.y = x, y
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.drop_remainder, self.num_epochs = drop_remainder, num_epochs
    self.augment = augment
    self.process_index, self.process_count = process_index, process_count
    self.start_index, self.num_threads = start_index, num_threads
    # Every process gets the same number of examples (collectives need the
    # same number of steps everywhere): drop the last n % process_count.
    self.per_process = len(y) // process_count
    self.batches_per_epoch = len(self._epoch(0))

  def _epoch(self, epoch: int):
    import grain  # pylint: disable=g-import-not-at-top
    n = self.per_process * self.process_count
    ds = grain.MapDataset.source(np.arange(n))
    if self.shuffle:
      ds = ds.shuffle(seed=_epoch_seed(self.seed, epoch))
    ds = ds[self.process_index::self.process_count]
    ds = ds.batch(self.batch_size, drop_remainder=self.drop_remainder)
    return ds.map_with_index(functools.partial(self._load, epoch))

  def _load(self, epoch: int, index: int, idx: np.ndarray) -> dict:
    images = _gather(self.x, idx)
    labels = np.asarray(self.y[idx], dtype=np.int32)
    if self.augment is not None:
      rng = np.random.default_rng(
          [self.seed, epoch, index, self.process_index])
      images = self.augment(images, rng)
    return {"image": images, "label": labels}

  def __len__(self) -> int:
    if self.num_epochs is None:
      raise TypeError("An unbounded loader (num_epochs=None) has no length.")
    return self.num_epochs * self.batches_per_epoch - self.start_index

  def __iter__(self) -> Iterator[dict]:
    import grain  # pylint: disable=g-import-not-at-top
    epoch, skip = divmod(self.start_index, max(self.batches_per_epoch, 1))
    while self.num_epochs is None or epoch < self.num_epochs:
      ds = self._epoch(epoch)[skip:]
      if self.num_threads > 0:
        ds = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=self.num_threads,
            prefetch_buffer_size=2 * self.num_threads))
      yield from ds
      epoch, skip = epoch + 1, 0


def make_loader(x, y, *, batch_size: int, seed: int, shuffle: bool = True,
                drop_remainder: bool = True, num_epochs: Optional[int] = 1,
                augment: Union[None, str, Callable[..., Any]] = None,
                shard_by_process: bool = True, start_index: int = 0,
                process_index: Optional[int] = None,
                process_count: Optional[int] = None,
                num_threads: int = 0) -> Loader:
  """A grain pipeline of per-process batches over ``(x, y)``.

  Epoch ``e`` shuffles all examples with a seed derived from ``(seed, e)``
  (grain's ``MapDataset.shuffle``), process ``p`` of ``P`` keeps positions
  ``p, p + P, ...`` of that permutation (disjoint shards, equal sizes), and
  batches them. Augmentation draws from a numpy Generator seeded with
  ``(seed, e, batch index, p)``: the same arguments give the same batches.

  Args:
    x: images ``[N, H, W, C]`` (float, or uint8 scaled to ``[0, 1]``), or a
      random-access sequence of images.
    y: int labels ``[N]``.
    batch_size: the per-process batch size.
    seed: the shuffle and augmentation seed.
    shuffle: shuffle each epoch (evaluation loaders: ``False``).
    drop_remainder: drop each epoch's last incomplete batch.
    num_epochs: epochs to run through (``None``: forever).
    augment: ``None``, ``"cifar"``, ``"imagenet"`` or a function
      ``(images, rng) -> images``.
    shard_by_process: split the data across JAX processes.
    start_index: batches (of this process) already consumed, e.g. the step of
      a resumed run; the loader continues right after them.
    process_index, process_count: override ``jax.process_index()`` /
      ``jax.process_count()`` (used when ``shard_by_process``).
    num_threads: grain read threads (0: load in the calling thread).

  Returns:
    A :class:`Loader`: iterable (re-iterable) with ``len`` and
    ``batches_per_epoch``.

  Examples:
    >>> import numpy as np
    >>> x, y = np.zeros((10, 2, 2, 1), np.float32), np.arange(10)
    >>> loader = make_loader(x, y, batch_size=4, seed=0, num_epochs=2)
    >>> [len(b["label"]) for b in loader]
    [4, 4, 4, 4]
  """
  if batch_size < 1:
    raise ValueError(f"make_loader: batch_size must be >= 1, got "
                     f"{batch_size}.")
  if len(x) != len(y):
    raise ValueError(f"make_loader: x has {len(x)} examples but y has "
                     f"{len(y)}.")
  if num_epochs is not None and num_epochs < 0:
    raise ValueError(f"make_loader: num_epochs must be >= 0 or None, got "
                     f"{num_epochs}.")
  if start_index < 0:
    raise ValueError(f"make_loader: start_index must be >= 0, got "
                     f"{start_index}.")
  if isinstance(augment, str):
    if augment not in AUGMENTATIONS:
      raise ValueError(f"make_loader: unknown augment {augment!r}; use one "
                       f"of {sorted(AUGMENTATIONS)}, None or a function.")
    augment = AUGMENTATIONS[augment]
  if shard_by_process:
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = (jax.process_index() if process_index is None
                       else process_index)
      process_count = (jax.process_count() if process_count is None
                       else process_count)
  else:
    process_index, process_count = 0, 1
  if not 0 <= process_index < process_count:
    raise ValueError(f"make_loader: process_index {process_index} is not in "
                     f"[0, process_count={process_count}).")
  if isinstance(y, (list, tuple)):
    y = np.asarray(y)
  loader = Loader(x, y, batch_size=batch_size, seed=seed, shuffle=shuffle,
                  drop_remainder=drop_remainder, num_epochs=num_epochs,
                  augment=augment, process_index=process_index,
                  process_count=process_count, start_index=start_index,
                  num_threads=num_threads)
  if loader.batches_per_epoch == 0:
    raise ValueError(
        f"make_loader: {len(y)} examples over {process_count} process(es) "
        f"give no batch of {batch_size} (drop_remainder={drop_remainder}).")
  return loader
