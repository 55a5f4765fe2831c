"""Image datasets from local files (npz, IDX, Debian's Fashion-MNIST), the discrete image likelihoods, the
sample-quality metrics against hand computations, and short learning runs on a Fashion-MNIST subset."""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import linalg, stats
from typer.testing import CliRunner

from labfleet.algorithms import registry
from labfleet.algorithms.generative import metrics as GM
from labfleet.cli import app
from labfleet.data import datasets, images
from labfleet.spec.loading import load_spec
from tests.conftest import EXPERIMENTS

FASHION = images.DEBIAN_DIRS["fashion_mnist"]


def _fashion_mnist() -> None:
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        message = "Debian's dataset-fashion-mnist is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _write_idx(file: Path, array: np.ndarray) -> None:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(file, "wb") as handle:
        handle.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_npz_and_idx_files_round_trip_with_their_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = {"x_train": rng.integers(0, 256, (60, 12, 16), dtype=np.uint8), "y_train": rng.integers(0, 3, 60),
            "x_test": rng.integers(0, 256, (20, 12, 16), dtype=np.uint8), "y_test": rng.integers(0, 3, 20)}
    np.savez(tmp_path / "grey.npz", **grey)
    rgb = {"x_train": rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8),
           "x_test": rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)}
    np.savez(tmp_path / "rgb.npz", **rgb)
    idx = tmp_path / "idx"
    idx.mkdir()
    for key, name in images.IDX_FILES.items():
        _write_idx(idx / f"{name}.gz", grey[key].astype(np.uint8 if key.startswith("x") else np.int32))

    for source in (tmp_path / "grey.npz", idx):
        info = images.describe("images", str(source))
        assert (info.shape, info.n_train, info.n_test, info.labels) == ((1, 12, 16), 60, 20, True)
        arrays = images.read("images", str(source))
        assert np.array_equal(arrays["x_train"][:, 0], grey["x_train"]) and arrays["x_train"].dtype == np.uint8
        assert np.array_equal(arrays["y_test"], grey["y_test"])
    info = images.describe("images", str(tmp_path / "rgb.npz"))
    assert (info.shape, info.labels) == ((3, 8, 8), False)
    assert np.array_equal(images.read("images", str(tmp_path / "rgb.npz"))["x_test"],
                          rgb["x_test"].transpose(0, 3, 1, 2))

    data = datasets.load("images", path=str(tmp_path / "grey.npz"), n_valid=10, limit=30, eval_limit=8)
    assert (len(data.train), len(data.valid), len(data.test), data.shape) == (30, 8, 8, (1, 12, 16))
    again = datasets.load("images", seed=5, path=str(tmp_path / "grey.npz"), n_valid=10)
    assert np.array_equal(again.valid[:8], data.valid)  # the held-out split does not depend on seed or limit
    assert np.array_equal(again.train[:30], data.train)  # `limit` keeps the first training images
    assert not {tuple(x.ravel()) for x in data.valid} & {tuple(x.ravel()) for x in again.train}


@pytest.mark.parametrize("case, field, words", [
    ("float", "dataset_kwargs.path", "uint8"),
    ("mixed", "dataset_kwargs.path", "one shape"),
    ("no-test", "dataset_kwargs.path", "x_test"),
    ("labels", "dataset_kwargs.path", "labels for"),
    ("not-npz", "dataset_kwargs.path", "not a .npz"),
    ("bad-kwarg", "dataset_kwargs.shuffle", "takes no argument"),
    ("gan-no-labels", "dataset", "y_train"),
    ("n-valid", "dataset_kwargs.n_valid", "none to train"),
])
def test_bad_image_files_are_refused_at_validation(tmp_path: Path, case: str, field: str, words: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    arrays = {"x_train": x, "x_test": x[:10], "y_train": np.zeros(40, dtype=np.int64)}
    algorithm, kwargs = "vae", {}
    if case == "float":
        arrays["x_train"] = x.astype(np.float32)
    elif case == "mixed":
        arrays["x_test"] = rng.integers(0, 256, (10, 4, 4), dtype=np.uint8)
    elif case == "no-test":
        del arrays["x_test"]
    elif case == "labels":
        arrays["y_train"] = np.zeros(39, dtype=np.int64)
    elif case == "bad-kwarg":
        kwargs = {"shuffle": True}
    elif case == "gan-no-labels":
        del arrays["y_train"]
        algorithm = "gan"
    elif case == "n-valid":
        kwargs = {"n_valid": 40}
    data_file = tmp_path / "data.npz"
    if case == "not-npz":
        data_file.write_text("pixels")
    else:
        np.savez(data_file, **arrays)
    spec = {"name": "img", "algorithm": algorithm, "dataset": "images", "seeds": [0], "budget": {"iterations": 2},
            "dataset_kwargs": {"path": str(data_file), **kwargs}, "hparams": {"architecture": "conv"}}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["validate", str(spec_file)])
    assert result.exit_code == 2, result.output
    assert f"{field}:" in result.output and words in result.output, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([data_file.name, "spec.yaml"])


def test_discretised_logistic_is_a_distribution_over_the_levels() -> None:
    n = 255
    levels = torch.arange(n + 1, dtype=torch.float32).reshape(-1, 1)
    for location, log_scale in ((0.0, -3.0), (2.0, -1.0), (-4.0, -6.0), (0.3, 0.5)):
        logits = torch.full_like(levels, location)
        log_p = GM.discretized_logistic_log_prob(levels, logits, torch.full_like(levels, log_scale), n)
        assert float(torch.logsumexp(log_p.double(), 0)) == pytest.approx(0.0, abs=2e-4), (location, log_scale)
    # an inner level's mass is the logistic CDF's difference over its bin
    mu, s = 1 / (1 + math.exp(-0.4)), math.exp(-2.0)
    expected = stats.logistic.cdf(100.5 / n, mu, s) - stats.logistic.cdf(99.5 / n, mu, s)
    got = GM.discretized_logistic_log_prob(torch.tensor([[100.0]]), torch.tensor([[0.4]]), torch.tensor([[-2.0]]), n)
    assert float(got.exp()) == pytest.approx(expected, rel=1e-4)


def test_the_pixel_histogram_baseline_is_the_smoothed_categorical() -> None:
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, 4, (50, 3)), rng.integers(0, 4, (7, 3))
    nll = 0.0
    for d in range(3):
        p = (np.bincount(train[:, d], minlength=4) + 1) / (50 + 4)
        nll -= np.log(p[test[:, d]]).sum()
    assert GM.pixel_histogram_nll(train, test, 3) == pytest.approx(nll / 7)


def test_fd_kid_precision_recall_against_hand_computations() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (400, 3)), rng.normal(0.5, 2, (500, 3))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert GM.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)

    x, y = rng.normal(0, 1, (30, 4)), rng.normal(1, 1, (30, 4))

    def k(u, v):
        return (u @ v.T / 4 + 1) ** 3

    m = 30
    mmd = ((k(x, x).sum() - np.trace(k(x, x))) / (m * (m - 1)) + (k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1))
           - 2 * k(x, y).mean())
    assert GM.kernel_inception_distance(x, y, subsets=3, size=30) == pytest.approx(mmd)  # every subset is all
    same = GM.kernel_inception_distance(a[:200], a[200:], subsets=5, size=200)  # unbiased: about 0
    assert abs(same) < 0.05 * GM.kernel_inception_distance(a, b, subsets=5, size=200)

    real = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    fake = np.array([[0.5], [1.5], [11.0], [50.0]])
    precision, recall = GM.precision_recall(real, fake, k=1)
    # real radii (1st neighbour): 1 each; fake points within: 0.5, 1.5, 11 -> 3 of 4
    # fake radii: 1, 1, 9.5, 39 -> real points within: 0, 1, 2 (near 0.5/1.5), 10, 11, 12 (near 11 or 50) -> 6 of 6
    assert (precision, recall) == (0.75, 1.0)


@pytest.mark.slow
def test_conv_vae_on_fashion_mnist_beats_the_independent_pixel_baseline(tmp_path: Path, monkeypatch) -> None:
    _fashion_mnist()
    monkeypatch.setenv("LABFLEET_CACHE", str(tmp_path))
    spec = load_spec(EXPERIMENTS / "fashion_mnist_vae.yaml", {
        "dataset_kwargs": {"limit": 5000, "eval_limit": 1000}, "budget": {"iterations": 300},
        "hparams.elbo_samples": 2})
    trainer = registry.get("vae").trainer(spec, 0, "cpu")
    while not trainer.done:
        trainer.train_iteration()
    result = trainer.evaluate()
    baseline_bits = result["eval/baseline_nll"] / (784 * math.log(2))
    assert result["eval/bits_per_dim"] < baseline_bits - 0.3, result
    assert {"eval/fd", "eval/kid", "eval/precision", "eval/recall"} <= set(result)
    assert {"samples/step_00000300.png", "reconstructions/step_00000300.png"} <= set(trainer.media())


@pytest.mark.slow
def test_dcgan_on_fashion_mnist_beats_a_gaussian_fit(tmp_path: Path, monkeypatch) -> None:
    _fashion_mnist()
    monkeypatch.setenv("LABFLEET_CACHE", str(tmp_path))
    spec = load_spec(EXPERIMENTS / "fashion_mnist_dcgan.yaml", {
        "dataset_kwargs": {"limit": 2000, "eval_limit": 2500}, "budget.iterations": 600})
    trainer = registry.get("gan").trainer(spec, 0, "cpu")
    while not trainer.done:
        trainer.train_iteration()
    result = trainer.evaluate()
    # the trivial generator: independent Gaussian pixels fitted to the training images
    train = trainer.data.train.reshape(len(trainer.data.train), -1).astype(np.float64)
    rng = np.random.default_rng(0)
    fitted = np.clip(train.mean(0) + train.std(0) * rng.standard_normal((2500, 784)), 0, 255)
    trivial = trainer.image_quality(torch.as_tensor(fitted, dtype=torch.float32).reshape(-1, 1, 28, 28),
                                    trainer.test_x)
    assert result["eval/fd"] < 0.5 * trivial["eval/fd"], (result, trivial)
    assert result["eval/recall"] > trivial["eval/recall"]


@pytest.mark.slow
def test_the_feature_classifier_is_trained_once_and_cached_on_disk(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LABFLEET_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    train = (rng.integers(0, 100, (300, 1, 6, 6)) + 150 * labels[:, None, None, None]).astype(np.uint8)
    model, accuracy = GM.feature_classifier(train, labels, train, labels)
    assert accuracy > 0.95
    (file,) = tmp_path.glob("feature-classifiers/*.pt")
    monkeypatch.setattr(GM, "_CLASSIFIERS", {})  # a new process: only the disk cache is left
    torch.save({k: v + 1 for k, v in model.state_dict().items()}, file)  # marked, to see it is read back
    again, _ = GM.feature_classifier(train, labels)
    assert all(torch.equal(again.state_dict()[k], v + 1) for k, v in model.state_dict().items())
    file.write_bytes(b"garbage")  # a damaged cache file is replaced, not trusted
    monkeypatch.setattr(GM, "_CLASSIFIERS", {})
    third, _ = GM.feature_classifier(train, labels)
    assert all(torch.equal(third.state_dict()[k], v) for k, v in model.state_dict().items())


def test_sample_grids_draw_colour_images_in_colour() -> None:
    import io

    from matplotlib import image

    from labfleet.algorithms.generative.plots import image_grid_png

    red = np.zeros((4, 3, 16, 16))
    red[:, 0] = 1.0
    pixels = image.imread(io.BytesIO(image_grid_png(red, "red")))[..., :3]
    reddish = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.1) & (pixels[..., 2] < 0.1)
    assert reddish.mean() > 0.3  # the tiles are red, not the grey of one channel
    grey = image.imread(io.BytesIO(image_grid_png(red[:, :1], "grey")))[..., :3]
    assert np.allclose(grey[..., 0], grey[..., 1], atol=0.02)  # one channel: grey


def test_likelihoods_of_bf16_outputs_are_summed_in_float32() -> None:
    rng = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 1, 28, 28), generator=rng).float()
    logits, log_scale = torch.randn(4, 1, 28, 28, generator=rng), torch.randn(4, 1, 28, 28, generator=rng) - 3
    exact = GM.discretized_logistic_log_prob(x, logits, log_scale, 255)
    low = GM.discretized_logistic_log_prob(x, logits.bfloat16(), log_scale.bfloat16(), 255)
    assert low.dtype == torch.float32
    # only the inputs' rounding differs: far below what bf16 arithmetic over 784 pixels would lose
    assert torch.allclose(low, GM.discretized_logistic_log_prob(x, logits.bfloat16().float(),
                                                                log_scale.bfloat16().float(), 255))
    assert (low - exact).abs().max() < 0.02 * exact.abs().max()
    binomial = GM.binomial_log_prob(x, logits.bfloat16(), 255)
    assert binomial.dtype == torch.float32


def test_a_folder_of_png_and_jpeg_images_with_class_subfolders(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for label, colour in ((0, (255, 0, 0)), (1, (0, 0, 255))):
            folder = tmp_path / "shapes" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(0, 20, (10, 12, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    path = str(tmp_path / "shapes")
    info = images.describe("images", path)
    assert (info.shape, info.n_train, info.n_test, info.labels) == ((3, 10, 12), 12, 4, True)
    arrays = images.read("images", path)
    assert arrays["x_train"].shape == (12, 3, 10, 12) and arrays["y_test"].tolist() == [0, 0, 1, 1]
    assert (arrays["x_train"][arrays["y_train"] == 0][:, 0] > 200).all()  # class0 is red
    assert (arrays["x_train"][arrays["y_train"] == 1][:, 2] > 200).all()
    data = datasets.load("images", path=path, n_valid=2, size=[8, 8])
    assert data.shape == (3, 8, 8) and len(data.train) == 10 and len(data.test) == 4

    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "shapes" / "test" / "class1" / "odd.png")
    with pytest.raises(images.ImageDataError, match="several sizes"):
        images.describe("images", path)
    assert images.describe("images", path, (8, 8)).shape == (3, 8, 8)


@pytest.mark.slow
def test_bernoulli_likelihood_binarises_training_afresh_and_evaluation_once(tmp_path: Path, monkeypatch) -> None:
    _fashion_mnist()
    monkeypatch.setenv("LABFLEET_CACHE", str(tmp_path))
    spec = load_spec(EXPERIMENTS / "fashion_mnist_vae.yaml", {
        "dataset_kwargs": {"limit": 3000, "eval_limit": 300}, "budget": {"iterations": 80},
        "hparams.likelihood": "bernoulli"})
    a, b = (registry.get("vae").trainer(spec, seed, "cpu") for seed in (0, 1))
    assert torch.equal(a.test_target, b.test_target)  # one fixed binarisation, whatever the seed
    assert set(a.test_target.unique().tolist()) == {0.0, 255.0}
    assert abs(float(a.test_target.mean() - a.test_x.mean())) < 3.0  # on with probability intensity / 255
    batch = a.train_x[:64].float()
    assert not torch.equal(a.binarise(batch, a.torch_gen), a.binarise(batch, a.torch_gen))  # afresh each time
    while not a.done:
        a.train_iteration()
    result = a.evaluate()
    assert result["eval/neg_elbo"] < result["eval/baseline_nll"], result
    assert result["eval/bits_per_dim"] == pytest.approx(result["eval/neg_elbo"] / (784 * math.log(2)))


def test_data_import_turns_idx_files_and_image_folders_into_one_npz(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    idx = tmp_path / "idx"
    idx.mkdir()
    grey = {"x_train": rng.integers(0, 256, (30, 6, 6), dtype=np.uint8), "y_train": rng.integers(0, 4, 30),
            "x_test": rng.integers(0, 256, (10, 6, 6), dtype=np.uint8), "y_test": rng.integers(0, 4, 10)}
    for key, name in images.IDX_FILES.items():
        _write_idx(idx / name, grey[key].astype(np.uint8 if key.startswith("x") else np.int32))
    out = tmp_path / "idx.npz"
    result = CliRunner().invoke(app, ["data", "import", str(idx), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with np.load(out) as data:
        assert all(np.array_equal(data[k], grey[k]) for k in grey)
    folder = tmp_path / "pictures"
    for split in ("train", "test"):
        (folder / split).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(folder / split / f"{i}.png")
    result = CliRunner().invoke(app, ["data", "import", str(folder), "--out", str(tmp_path / "rgb.npz"),
                                      "--size", "4", "4"])
    assert result.exit_code == 0, result.output
    assert images.describe("images", str(tmp_path / "rgb.npz")) == images.ImageFiles(
        tmp_path / "rgb.npz", (3, 4, 4), 3, 3, False)
    for args, word in ((["data", "import", str(tmp_path / "missing"), "--out", str(tmp_path / "m.npz")], "no file"),
                       (["data", "import", str(idx), "--out", str(out)], "exists"),
                       (["data", "import", str(idx), "--out", str(tmp_path / "x.txt")], ".npz")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and word in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "idx.npz", "pictures", "rgb.npz"]


def test_the_resnet_vae_trains_and_resumes_exactly() -> None:
    from labfleet import testing

    spec = load_spec(EXPERIMENTS / "digits_vae.yaml", {
        "budget.epochs": 3, "hparams.early_stopping": None, "hparams.architecture": "resnet",
        "hparams.channels": [16, 16], "hparams.iwae_samples": 1})

    def build(seed):
        return registry.get("vae").trainer(spec, seed, "cpu")

    trainer = build(0)
    start = trainer.evaluate()["eval/neg_elbo"]
    while not trainer.done:
        trainer.train_iteration()
    assert trainer.evaluate()["eval/neg_elbo"] < 0.8 * start
    testing.check_exact_resume(build, iterations=10)
    result = CliRunner().invoke(app, ["validate", str(EXPERIMENTS / "digits_vae.yaml"), "--set",
                                      "hparams.architecture=resnet", "--set", "hparams.channels=[16, 16, 16, 16]"])
    assert result.exit_code == 2 and "multiple of 16" in result.output, result.output


def test_a_hugging_face_dataset_saved_to_disk_is_read_without_the_hub(tmp_path: Path) -> None:
    import datasets as hf
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (6, 5), dtype=np.uint8) for _ in range(7)]
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(names=["shirt", "shoe"])})
    hf.DatasetDict({
        "train": hf.Dataset.from_dict({"image": [Image.fromarray(p) for p in pictures[:5]],
                                       "label": [0, 1, 1, 0, 1]}, features=features),
        "test": hf.Dataset.from_dict({"image": [Image.fromarray(p) for p in pictures[5:]], "label": [1, 0]},
                                     features=features),
    }).save_to_disk(str(tmp_path / "hf"))
    info = images.describe("images", str(tmp_path / "hf"))
    assert (info.shape, info.n_train, info.n_test, info.labels) == ((1, 6, 5), 5, 2, True)
    arrays = images.read("images", str(tmp_path / "hf"))
    assert all(np.array_equal(arrays["x_train"][i, 0], pictures[i]) for i in range(5))
    assert arrays["y_train"].tolist() == [0, 1, 1, 0, 1] and arrays["y_test"].tolist() == [1, 0]
    (tmp_path / "hf" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(images.ImageDataError, match="train and test are needed"):
        images.describe("images", str(tmp_path / "hf"))
