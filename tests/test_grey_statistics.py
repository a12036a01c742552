"""The histogram medians and percentiles of uint8 grey levels are numpy's, exactly (the severity figures use them)."""

import numpy as np
import pytest

from scripts.grey_statistics import median, percentiles


@pytest.mark.parametrize("seed", range(5))
def test_uint8_medians_and_percentiles_equal_numpys(seed):
    rng = np.random.default_rng(seed)
    for size in (1, 2, 3, 4, 7, 10, 255, 1000, 4097):
        low, high = sorted(rng.integers(0, 256, 2))
        values = rng.integers(low, high + 1, size).astype(np.uint8)
        shares = [0, 0.5, 5, 50, 95, 99.5, 100, float(rng.uniform(0, 100))]
        assert percentiles(values, shares) == [float(value) for value in np.percentile(values, shares)], values
        assert median(values) == float(np.median(values)), values


def test_other_dtypes_and_images_go_to_numpy():
    image = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    assert median(image) == float(np.median(image)) and percentiles(image, [5, 95]) == list(
        np.percentile(image, [5, 95])
    )
    grey = (np.arange(20 * 30) % 256).astype(np.uint8).reshape(20, 30)  # 2D input: all pixels count
    assert median(grey) == float(np.median(grey))
