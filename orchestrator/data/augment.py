"""Random augmentation, vectorised in numpy over a whole batch (no torchvision).

Every transform is a plain function `f(x, rng, ...)` on an (N, C, H, W) float32 batch
(noise also on any shape), usable from any loop. `augment_batch` chains the ones the spec
turns on; mixup and cutmix also mix the (one-hot) labels. Keel calls it inside Ray Data
`map_batches`, seeded from (seed, epoch, batch content), so each sample's augmentation is
reproducible and changes every epoch.
"""

from __future__ import annotations

import zlib

import numpy as np


def random_crop(x: np.ndarray, rng: np.random.Generator, padding: int, order: np.ndarray | None = None) -> np.ndarray:
    """Zero-pad by `padding` and crop back to the original size at a random offset per sample; with `order`,
    of the rows x[order] (the gather of a shuffle done in the same pass).

    Done as one slice copy per distinct offset ((2 padding + 1)^2 of them) rather than padding the batch and
    gathering every pixel by index: the same output for the same draws, 5x faster on a 16,000-image block
    (0.08 vs 0.47 s for 3x32x32, padding 4) and 3x on batches of 128 (0.15 vs 0.49 s), measured on the 2-core machine."""
    n, _, h, w = x.shape
    side = 2 * padding + 1
    dy, dx = rng.integers(0, side, size=(2, n))
    out = np.zeros(x.shape, x.dtype)  # not zeros_like (a memset pass): a large np.zeros is fresh, already-zero pages
    offset = dy * side + dx
    by_offset = np.argsort(offset, kind="stable")
    bounds = np.searchsorted(offset[by_offset], np.arange(side * side + 1))
    for k in np.flatnonzero(np.diff(bounds)):
        rows = by_offset[bounds[k]:bounds[k + 1]]
        source = rows if order is None else order[rows]
        oy, ox = k // side - padding, k % side - padding   # out[r, c] = x[r + oy, c + ox] where that is inside
        r0, r1, c0, c1 = max(0, -oy), min(h, h - oy), max(0, -ox), min(w, w - ox)
        if r0 < r1 and c0 < c1:
            out[rows, :, r0:r1, c0:c1] = x[source, :, r0 + oy:r1 + oy, c0 + ox:c1 + ox]
    return out


def hflip(x: np.ndarray, rng: np.random.Generator, p: float = 0.5, in_place: bool = False) -> np.ndarray:
    """Mirror each sample left-right with probability p. in_place: flip x's own rows (half the memory traffic;
    for an array the caller made, as augment_batch does after a crop)."""
    flip = rng.random(len(x)) < p
    if in_place:
        rows = np.flatnonzero(flip)
        x[rows] = x[rows, ..., ::-1]
        return x
    return np.where(flip.reshape((-1,) + (1,) * (x.ndim - 1)), x[..., ::-1], x)


def gaussian_noise(x: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    return x + rng.normal(0.0, std, size=x.shape).astype(x.dtype)


def cutout(x: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Zero a size x size square at a random centre per sample (DeVries & Taylor, 2017)."""
    n, _, h, w = x.shape
    cy, cx = rng.integers(0, h, n), rng.integers(0, w, n)
    ys, xs = np.arange(h)[None, :], np.arange(w)[None, :]
    mask_y = np.abs(ys - cy[:, None]) <= size // 2
    mask_x = np.abs(xs - cx[:, None]) <= size // 2
    mask = mask_y[:, :, None] & mask_x[:, None, :]
    return np.where(mask[:, None], 0.0, x).astype(x.dtype)


def brightness_contrast(x: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float) -> np.ndarray:
    n = len(x)
    b = rng.uniform(-brightness, brightness, n).astype(x.dtype)
    c = rng.uniform(1 - contrast, 1 + contrast, n).astype(x.dtype)
    axes = tuple(range(1, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    shape = (n,) + (1,) * (x.ndim - 1)
    return (x - mean) * c.reshape(shape) + mean + b.reshape(shape)


def mixup(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Zhang et al. 2018: convex combinations of sample pairs and of their one-hot labels."""
    lam = rng.beta(alpha, alpha, len(x)).astype(np.float32)
    perm = rng.permutation(len(x))
    lx = lam.reshape((-1,) + (1,) * (x.ndim - 1))
    return lx * x + (1 - lx) * x[perm], lam[:, None] * y + (1 - lam[:, None]) * y[perm]


def cutmix(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Yun et al. 2019: paste a random box from another sample; labels mixed by box area."""
    n, _, h, w = x.shape
    lam = rng.beta(alpha, alpha)
    bh, bw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    y0, y1, x0, x1 = max(cy - bh // 2, 0), min(cy + bh // 2, h), max(cx - bw // 2, 0), min(cx + bw // 2, w)
    perm = rng.permutation(n)
    out = x.copy()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    area = (y1 - y0) * (x1 - x0) / (h * w)
    return out, (1 - area) * y + area * y[perm]


def batch_seed(seed: int, epoch: int, x: np.ndarray) -> list[int]:
    """Seed from (seed, epoch, the batch's first sample): stable however Ray schedules the tasks."""
    return [seed, epoch, zlib.crc32(np.ascontiguousarray(x[:1]).tobytes())]


def augment_batch(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, spec,
                  order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply the transforms `spec` (AugmentSpec) turns on, in a fixed order. x: (N, *shape).
    order: augment x[order] (y is given in that order already); a crop gathers them in its own pass."""
    image = x.ndim == 4
    cropped = image and bool(spec.random_crop_padding)
    if cropped:
        x = random_crop(x, rng, spec.random_crop_padding, order=order)
    elif order is not None:
        x = x[order]
    if image and spec.hflip:
        x = hflip(x, rng, spec.hflip, in_place=cropped)  # the crop's output is ours to change
    if spec.brightness or spec.contrast:
        x = brightness_contrast(x, rng, spec.brightness, spec.contrast)
    if spec.noise_std:
        x = gaussian_noise(x, rng, spec.noise_std)
    if image and spec.cutout:
        x = cutout(x, rng, spec.cutout)
    if spec.mixup_alpha and (not spec.cutmix_alpha or rng.random() < 0.5):
        x, y = mixup(x, y, rng, spec.mixup_alpha)
    elif image and spec.cutmix_alpha:
        x, y = cutmix(x, y, rng, spec.cutmix_alpha)
    return x.astype(np.float32, copy=False), y
