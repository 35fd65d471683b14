import math

import pytest

from greencode.config import ExitConfig, LiteLossConfig
from greencode.exits import default_exit_points, lite_weights, resolve_exit_points


def test_published_exit_point_counts():
    # Llama 3.2 3B (28 layers): the authors' 0-based [3,5,7,9,11,13,17,21,25] in our 1-based convention.
    assert default_exit_points(28) == [4, 6, 8, 10, 12, 14, 18, 22, 26]
    assert len(default_exit_points(32)) == 10  # OPT 2.7B
    assert default_exit_points(32) == [4, 6, 8, 10, 12, 14, 16, 20, 24, 28]


def test_smollm2_exit_points_exclude_final_layer():
    points = default_exit_points(30)
    assert points == [4, 6, 8, 10, 12, 14, 18, 22, 26]
    assert 30 not in points


def test_explicit_list_validated():
    assert resolve_exit_points(12, ExitConfig(exit_points=[2, 5])) == [2, 5]
    with pytest.raises(ValueError, match="strictly increasing"):
        resolve_exit_points(12, ExitConfig(exit_points=[5, 2]))
    with pytest.raises(ValueError, match="1..11"):
        resolve_exit_points(12, ExitConfig(exit_points=[4, 12]))


@pytest.mark.parametrize("layers", [28, 30, 32])
def test_decaying_weights_sum_to_budgets(layers):
    points = default_exit_points(layers)
    w = lite_weights(points, layers)
    first = [wi for k, wi in zip(points, w) if k <= layers / 2]
    second = [wi for k, wi in zip(points, w) if k > layers / 2]
    assert math.isclose(sum(first), 0.7) and math.isclose(sum(second), 0.2)
    assert w[-1] == 0.1 and len(w) == len(points) + 1
    assert all(a > b for a, b in zip(first, first[1:]))  # earliest exit weighs most
    assert math.isclose(first[1] / first[0], 0.9)


def test_uniform_weights():
    w = lite_weights([4, 6, 10], 12, LiteLossConfig(scheme="uniform"))
    assert w == [0.25] * 4
