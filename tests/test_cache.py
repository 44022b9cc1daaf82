"""The cache-rate guard: the estimate from real headers, and the rate lowered against a RAM figure."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from pipeline.data.cache import case_bytes, fitting_cache_rate
from pipeline.data.datalist import cases
from pipeline.workflows import config_files


def test_the_estimate_is_the_resampled_float32_image_and_label(phantom_datalist: Path) -> None:
    case = cases(phantom_datalist, role="train")[0]
    # 40 x 44 x 36 voxels of 1.2 x 1.2 x 1.5 mm, at 2 mm: 24 x 26.4 x 27, image and label, float32.
    assert case_bytes(case, [2.0, 2.0, 2.0]) == int(24 * 26.4 * 27) * 4 * 2
    assert case_bytes(case, [1.2, 1.2, 1.5]) == 40 * 44 * 36 * 4 * 2


def test_a_cache_that_does_not_fit_gets_a_lower_rate_with_a_log_line(
    phantom_datalist: Path, caplog: pytest.LogCaptureFixture
) -> None:
    training = [*cases(phantom_datalist, role="train"), *cases(phantom_datalist, role="validation")]
    assert len(training) == 4  # of about 137 KB each at 2 mm
    per_case = case_bytes(training[0], [2.0, 2.0, 2.0])
    assert fitting_cache_rate(training, [2.0, 2.0, 2.0], 1.0, available=100 * per_case) == 1.0
    with caplog.at_level(logging.WARNING, logger="pipeline.data.cache"):
        rate = fitting_cache_rate(training, [2.0, 2.0, 2.0], 1.0, available=int(2.2 * 2 * per_case))
    assert int(len(training) * rate) == 2, "half the RAM figure holds two cases"
    assert "caching 2 cases" in caplog.text and str(phantom_datalist.parent) not in caplog.text
    assert fitting_cache_rate(training, [2.0, 2.0, 2.0], 1.0, available=per_case) == 0.0


def test_the_bundles_use_it(phantom_datalist: Path) -> None:
    parser = ConfigParser()
    parser.read_config(config_files("unet3d", "train"))
    parser.update({"datalist": str(phantom_datalist), "spacing": [2.0, 2.0, 2.0]})
    assert parser.get_parsed_content("train::dataset#cache_rate") == 1.0  # 4 tiny cases fit anywhere
    assert "fitting_cache_rate(@validate::cases" in parser.get("validate::dataset::cache_rate")
