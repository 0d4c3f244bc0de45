"""The benchmark harness's own accounting: orders of the limits rounds, and (on a private
cluster, tiny sizes) that its drains and enqueues count what they claim to count."""

from __future__ import annotations

import pytest

from benchmarks.limits import round_orders


@pytest.mark.parametrize("n", range(4, 26))
def test_limits_rounds_never_keep_a_variant_after_the_same_one(n):
    variants = [f"v{i}" for i in range(n)]
    for runs in range(2, n + 1):
        orders = round_orders(variants, runs)
        assert [sorted(o) for o in orders] == [sorted(variants)] * runs
        for v in variants:
            places = [o.index(v) for o in orders]
            assert len(set(places)) == runs, (v, orders)  # every round in another place
            before = [o[o.index(v) - 1] for o in orders if o.index(v) > 0]
            assert len(before) < runs or len(set(before)) > 1, (v, orders)
            if n % 2 == 0:  # a Williams design: each ordered pair at most once in n rounds
                assert len(set(before)) == len(before), (v, orders)
