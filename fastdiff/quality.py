"""Judge generated digits with a classifier trained on scikit-learn's ``load_digits``.

``judge(samples)`` takes images in ``[0, 1]`` of shape (N, 1, 16, 16) (the shipped model's output
after :func:`fastdiff.models.digits.to_unit_range`) or (N, 1, 8, 8), averages 2x2 blocks down to 8x8,
scales to sklearn's 0..16 range and classifies them. Good samples are classified confidently
(high ``mean_top_prob``) and cover all ten digits (``min_class_fraction`` near 0.1).

The classifier is an RBF-kernel logistic regression (multinomial ``LogisticRegression`` on the RBF kernel
against the training digits, ``gamma=0.002``, ``C=10``) fitted at call time on all 1,797 digits (about a
second, cached). Unlike a plain linear or MLP classifier it is *not* confident on inputs far from every
real digit (uniform noise or a blank image get a top probability near 0.2, a blend of two digits about
0.75), so a high ``mean_top_prob`` means digit-like samples. It is deterministic.

:func:`calibration` reports how the same classifier does on held-out *real* digits, which is the
yardstick for ``mean_top_prob``; the figures are in ``fastdiff/models/MODEL_CARD.md``.

scikit-learn is an optional dependency (``pip install scikit-learn``), imported lazily.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["calibration", "judge", "load_digits_images", "predict", "upsample2x"]

_SPLIT_SEED = 0
_INSTALL_HINT = "fastdiff.quality needs scikit-learn: pip install scikit-learn (or 'fastdiff[quality]')"


def _sklearn():
    try:
        from sklearn import datasets, linear_model
        from sklearn.metrics import pairwise
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    return datasets, linear_model, pairwise


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as ``(images, labels)``: images (1797, 8, 8) float64 in 0..16, labels (1797,) int."""
    datasets, _, _ = _sklearn()
    digits = datasets.load_digits()
    return digits.images.astype(np.float64), digits.target.astype(np.int64)


class _KernelLogisticRegression:
    """Multinomial logistic regression on the RBF-kernel features ``exp(-gamma |x - x_i|^2)``.

    ``x_i`` runs over the training set (1,797 features when fitted on all digits).
    """

    def __init__(self, gamma: float = 0.002, C: float = 10.0):
        self.gamma = gamma
        self.C = C

    def fit(self, x: np.ndarray, y: np.ndarray) -> _KernelLogisticRegression:
        _, linear_model, pairwise = _sklearn()
        self._pairwise = pairwise
        self.x_train_ = np.asarray(x, dtype=np.float64)
        self.lr_ = linear_model.LogisticRegression(C=self.C, max_iter=5000)
        self.lr_.fit(pairwise.rbf_kernel(self.x_train_, self.x_train_, gamma=self.gamma), y)
        self.classes_ = self.lr_.classes_
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        k = self._pairwise.rbf_kernel(np.asarray(x, dtype=np.float64), self.x_train_, gamma=self.gamma)
        return self.lr_.predict_proba(k)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(1)]


def _make_classifier() -> _KernelLogisticRegression:
    # Features are the 64 pixels in 0..16.
    return _KernelLogisticRegression(gamma=0.002, C=10.0)


@functools.lru_cache(maxsize=1)
def _classifier():
    images, labels = load_digits_images()
    clf = _make_classifier()
    clf.fit(images.reshape(len(images), -1), labels)
    return clf


def upsample2x(images: np.ndarray, mode: str = "bilinear") -> np.ndarray:
    """2x upsampling of (..., H, W) images along the last two axes, in numpy.

    ``"nearest"`` repeats pixels (the judge's 2x2 average pool inverts it exactly); ``"bilinear"`` matches
    ``torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)`` (how the shipped
    model's training data was made).
    """
    x = np.asarray(images, dtype=np.float64)
    if mode == "nearest":
        return np.repeat(np.repeat(x, 2, axis=-1), 2, axis=-2)
    if mode != "bilinear":
        raise ValueError(f"unknown mode {mode!r}")
    for axis in (-1, -2):
        n = x.shape[axis]
        prev = np.take(x, np.clip(np.arange(n) - 1, 0, n - 1), axis=axis)
        nxt = np.take(x, np.clip(np.arange(n) + 1, 0, n - 1), axis=axis)
        shape = list(x.shape)
        shape[axis] *= 2
        # Output pixel 2i is 0.75 x[i] + 0.25 x[i-1], pixel 2i+1 is 0.75 x[i] + 0.25 x[i+1] (edges clamped).
        x = np.stack([0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt], axis=axis).reshape(shape)
    return x


@functools.lru_cache(maxsize=4)
def calibration(test_size: float = 0.25) -> dict:
    """Accuracy and mean top-class probability of the judge's classifier on held-out real digits.

    Fits the same classifier on a stratified, seeded train split and scores the test split through
    :func:`judge`'s own preprocessing, three ways: the 8x8 images as they are (``"8x8"``), upsampled to
    16x16 with nearest neighbours (``"nearest"``; the 2x2 average pool inverts it, so it equals ``"8x8"``)
    and upsampled bilinearly (``"bilinear"``, the shipped model's training data; the average pool then
    gives a slightly blurred digit). Returns ``{"n_train", "n_test", "8x8": {"accuracy",
    "mean_top_prob"}, "nearest": {...}, "bilinear": {...}}``.
    """
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_images()
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_size, random_state=_SPLIT_SEED, stratify=labels
    )
    clf = _make_classifier()
    clf.fit(x_tr.reshape(len(x_tr), -1), y_tr)
    result = {"n_train": int(len(x_tr)), "n_test": int(len(x_te))}
    unit = (x_te / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    for name, imgs in (
        ("8x8", unit),
        ("nearest", upsample2x(unit, "nearest")),
        ("bilinear", upsample2x(unit)),
    ):
        prob = clf.predict_proba(_to_features(imgs))
        pred = clf.classes_[prob.argmax(1)]
        result[name] = {"accuracy": float((pred == y_te).mean()), "mean_top_prob": float(prob.max(1).mean())}
    return result


def _to_numpy(samples) -> np.ndarray:
    if hasattr(samples, "detach"):  # torch.Tensor, without importing torch here
        samples = samples.detach().to("cpu")
        if not samples.dtype.is_floating_point or samples.dtype.itemsize < 4:
            samples = samples.float()
        samples = samples.numpy()
    return np.asarray(samples, dtype=np.float64)


def _to_features(samples) -> np.ndarray:
    """(N,1,16,16) or (N,1,8,8) (the channel axis may be left out) in [0,1] -> (N, 64) in 0..16."""
    x = _to_numpy(samples)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected 1-channel images, got shape {x.shape}")
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1:] not in ((16, 16), (8, 8)):
        shape = _to_numpy(samples).shape
        raise ValueError(f"expected samples of shape (N,1,16,16) or (N,1,8,8), got {shape}")
    if x.shape[1] == 16:
        x = x.reshape(len(x), 8, 2, 8, 2).mean(axis=(2, 4))  # 2x2 average pool
    x = np.clip(x, 0.0, 1.0) * 16.0
    return x.reshape(len(x), 64)


def predict(samples) -> np.ndarray:
    """The judge's predicted digit (0..9) for each sample; same input as :func:`judge`."""
    return _classifier().predict(_to_features(samples))


def judge(samples) -> dict:
    """Classify generated digits in ``[0, 1]`` and summarise confidence and class coverage.

    ``samples``: float tensor or array, (N, 1, 16, 16) or (N, 1, 8, 8), values in ``[0, 1]`` (clipped).

    Returns ``{"n", "mean_top_prob", "class_counts" (10 ints, by predicted digit),
    "min_class_fraction", "max_class_fraction"}``.
    """
    feats = _to_features(samples)
    n = len(feats)
    if n == 0:
        raise ValueError("judge() needs at least one sample")
    clf = _classifier()
    prob = clf.predict_proba(feats)
    pred = clf.classes_[prob.argmax(1)]
    counts = np.bincount(pred, minlength=10)[:10]
    return {
        "n": int(n),
        "mean_top_prob": float(prob.max(1).mean()),
        "class_counts": [int(c) for c in counts],
        "min_class_fraction": float(counts.min() / n),
        "max_class_fraction": float(counts.max() / n),
    }
