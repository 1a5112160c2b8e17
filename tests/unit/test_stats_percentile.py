"""Percentiles are exact nearest-rank, also where floating point rounds the rank up."""

import math

from dnsguard.stats import percentile


def test_p999_of_a_thousand_is_the_999th_value() -> None:
    values = [float(i) for i in range(1, 1001)]
    assert percentile(values, 99.9) == 999.0
    assert percentile(values, 99) == 990.0
    assert percentile(values, 100) == 1000.0


def test_empty_sample_has_no_percentile() -> None:
    assert math.isnan(percentile([], 50))
