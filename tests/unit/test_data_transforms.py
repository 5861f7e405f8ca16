"""Augmentation, preprocessing and curriculum as plain functions."""

import numpy as np
import pytest

from orchestrator.data import augment as A
from orchestrator.data.curriculum import pacing, pool_sizes, thresholds
from orchestrator.data.preprocess import PreprocessState, apply_preprocess, fit_preprocess
from orchestrator.data.scan import SplitScan
from orchestrator.spec import AugmentSpec, CurriculumSpec, PreprocessSpec


def images(n=4, c=1, h=5, w=5):
    return np.arange(n * c * h * w, dtype=np.float32).reshape(n, c, h, w)


def test_random_crop_is_a_shift_of_the_original_with_zero_fill():
    x = images()
    out = A.random_crop(x, np.random.default_rng(0), padding=1)
    assert out.shape == x.shape
    for i in range(len(x)):  # each output equals the input shifted by some (dy, dx) in [-1, 1]^2
        matches = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                   if np.array_equal(out[i, 0], np.pad(x[i, 0], 1)[1 + dy:6 + dy, 1 + dx:6 + dx])]
        assert matches


def pad_and_gather_crop(x, rng, padding):
    """The crop's definition, pixel by pixel: zero-pad, then cut each sample at its drawn offset."""
    n, _, h, w = x.shape
    dy, dx = rng.integers(0, 2 * padding + 1, size=(2, n))
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    return np.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@pytest.mark.parametrize("shape, padding", [((300, 3, 6, 7), 2), ((40, 2, 5, 3), 6), ((9, 1, 4, 4), 0)])
def test_random_crop_equals_pad_and_gather_for_the_same_draws(shape, padding):
    # every offset, non-square images, a padding wider than the image: the output, and the random draws it
    # makes (an augmented run's stream stays the same across versions), are those of the definition
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    rng, reference_rng = np.random.default_rng(7), np.random.default_rng(7)
    assert np.array_equal(A.random_crop(x, rng, padding), pad_and_gather_crop(x, reference_rng, padding))
    assert rng.random() == reference_rng.random()
    order = np.random.default_rng(3).permutation(len(x))  # the pipeline's shuffle, gathered by the crop
    rng, reference_rng = np.random.default_rng(8), np.random.default_rng(8)
    assert np.array_equal(A.random_crop(x, rng, padding, order=order), pad_and_gather_crop(x[order], reference_rng, padding))


def test_augment_batch_leaves_its_input_alone():
    x = np.random.default_rng(2).normal(size=(16, 3, 8, 8)).astype(np.float32)
    before = x.copy()
    for spec in (AugmentSpec(random_crop_padding=2, hflip=1.0), AugmentSpec(hflip=1.0)):
        out, _ = A.augment_batch(x, np.zeros(16), np.random.default_rng(0), spec)
        assert np.array_equal(x, before) and not np.array_equal(out, x)


def test_hflip_probability_one_mirrors_every_image():
    x = images()
    assert np.array_equal(A.hflip(x, np.random.default_rng(0), p=1.0), x[..., ::-1])
    assert np.array_equal(A.hflip(x, np.random.default_rng(0), p=0.0), x)


def test_cutout_zeroes_one_square_per_sample():
    x = np.ones((8, 2, 9, 9), dtype=np.float32)
    out = A.cutout(x, np.random.default_rng(1), size=3)
    zeros = (out[:, 0] == 0).sum(axis=(1, 2))
    assert ((zeros >= 4) & (zeros <= 9)).all()  # a 3x3 square, clipped at borders
    assert np.array_equal(out[:, 0] == 0, out[:, 1] == 0)  # same square on every channel


def test_noise_brightness_contrast_keep_shape_and_change_values():
    x = images()
    rng = np.random.default_rng(0)
    assert A.gaussian_noise(x, rng, 0.1).std() > 0 and not np.array_equal(A.gaussian_noise(x, rng, 0.1), x)
    bc = A.brightness_contrast(x, rng, 0.5, 0.5)
    assert bc.shape == x.shape and not np.allclose(bc, x)


def test_mixup_and_cutmix_mix_labels_consistently():
    x = np.stack([np.zeros((1, 4, 4)), np.ones((1, 4, 4))]).astype(np.float32)
    y = np.eye(2, dtype=np.float32)
    xm, ym = A.mixup(x, y, np.random.default_rng(3), alpha=1.0)
    np.testing.assert_allclose(ym.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(xm.mean(axis=(1, 2, 3)), ym[:, 1], rtol=1e-5)  # pixel mean = weight of the ones-image
    xc, yc = A.cutmix(x, y, np.random.default_rng(5), alpha=1.0)
    np.testing.assert_allclose(yc.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(xc.mean(axis=(1, 2, 3)), yc[:, 1], rtol=1e-5)  # label weight = pasted area


def test_augment_batch_is_reproducible_per_seed_and_changes_with_epoch():
    x, y = np.random.default_rng(0).normal(size=(6, 1, 8, 8)).astype(np.float32), np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    spec = AugmentSpec(random_crop_padding=1, cutout=2, noise_std=0.1, mixup_alpha=0.2)
    run = lambda epoch: A.augment_batch(x, y, np.random.default_rng(A.batch_seed(7, epoch, x)), spec)
    assert np.array_equal(run(0)[0], run(0)[0]) and not np.array_equal(run(0)[0], run(1)[0])


def scan_of(x):
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    s = SplitScan(path="t", rows=len(x), width=x.shape[1])
    s.sum, s.sumsq, s.count = np.where(finite, x, 0).sum(0), np.where(finite, x, 0).__pow__(2).sum(0), finite.sum(0)
    s.sample = list(x)
    return s


def test_standardisation_uses_the_fitted_statistics_and_imputes_before_it():
    train = [[1.0, 10.0], [3.0, np.nan], [5.0, 30.0]]
    state = fit_preprocess(scan_of(train), PreprocessSpec(standardize="per_feature", impute="mean"), [2], 2, "error", False)
    np.testing.assert_allclose(state.mean, [3.0, 20.0])
    x, y, keep = apply_preprocess(np.array(train), np.array([0, 1, 0]), state)
    np.testing.assert_allclose(x[:, 1], [-1.0, 0.0, 1.0], atol=1e-6)  # NaN -> mean -> 0 after standardising
    assert keep.all() and y.dtype == np.int64


def test_drop_bad_rows_and_onehot():
    state = PreprocessState(drop_bad_rows=True, num_classes=3, onehot=True)
    x, y, keep = apply_preprocess(np.array([[1.0], [np.inf], [2.0], [3.0]]), np.array([0, 1, 5, 2]), state)
    assert keep.tolist() == [True, False, False, True]
    np.testing.assert_array_equal(y, [[1, 0, 0], [0, 0, 1]])
    # float labels (pandas writes a label column with a gap as float64): whole ones kept, 1.5 and a missing one dropped
    x, y, keep = apply_preprocess(np.zeros((4, 1)), np.array([0.0, 1.5, np.nan, 2.0]), PreprocessState(drop_bad_rows=True, num_classes=3))
    assert keep.tolist() == [True, False, False, True] and y.tolist() == [0, 2] and y.dtype == np.int64


@pytest.mark.parametrize("kind, expected", [("linear", [0.2, 0.6, 1.0, 1.0]), ("step", [0.2, 0.6, 1.0, 1.0])])
def test_pacing(kind, expected):
    assert [pacing(e, kind, 0.2, 2, steps=2) for e in range(4)] == pytest.approx(expected)


def test_root_pacing_and_pool_widening():
    assert pacing(0, "root", 0.5, 4) == pytest.approx(0.5) and pacing(4, "root", 0.5, 4) == 1.0
    assert pacing(1, "root", 0.5, 4) > pacing(1, "linear", 0.5, 4)  # root front-loads the growth
    scores = np.arange(100, dtype=float)
    limits = thresholds(scores, CurriculumSpec(enabled=True, start_fraction=0.25, full_epoch=3), 5)
    sizes = pool_sizes(scores, limits)
    assert sizes[0] == 25 and sizes == sorted(sizes) and sizes[3:] == [100, 100]
