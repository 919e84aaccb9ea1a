"""Training curves: the trailing mean drawn over long noisy series."""

import numpy as np
import pytest

from atlas_jax import plots


@pytest.mark.parametrize("window", [1, 3, 10, 37, 50])
def test_trailing_mean_is_each_points_mean_with_the_window_before_it(window):
    y = np.random.default_rng(0).random(37).tolist()
    want = [np.mean(y[max(0, i - window + 1): i + 1]) for i in range(len(y))]
    np.testing.assert_allclose(plots.trailing_mean(y, window), want, rtol=1e-12)


def test_a_long_series_is_drawn_with_its_trailing_mean(tmp_path, monkeypatch):
    drawn = []
    real_plot = plots.plt.Axes.plot

    def record(ax, x, y, *args, **kwargs):
        drawn.append((list(y), kwargs.get("label")))
        return real_plot(ax, x, y, *args, **kwargs)

    monkeypatch.setattr(plots.plt.Axes, "plot", record)
    x = list(range(1, 41))
    rising = [0.4 + 0.005 * i + (0.1 if i % 2 else -0.1) for i in x]  # a trend under batch-to-batch noise
    plots.curves(str(tmp_path / "r.png"), "reward", {"reward": (x, rising), "short": (x[:5], rising[:5])})
    assert (tmp_path / "r.png").stat().st_size > 1000
    (raw, no_label), (smooth, label), (short, short_label) = drawn
    assert raw == rising and no_label is None and label == "reward (mean of 4)" and short_label == "short"
    np.testing.assert_allclose(smooth, plots.trailing_mean(rising, 4))
    assert smooth[-1] - smooth[4] == pytest.approx(0.005 * (40 - 5))  # the noise averages out, the trend stays
