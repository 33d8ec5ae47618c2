"""Unit tests for ops/noise.py (min-min PGD, class-wise updates, release, noise codec) and ops/metrics.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import surrogates
from ops.choices import parse_fraction
from ops.metrics import l2, linf, psnr
from ops.noise import (
    NOISE_LEVELS,
    apply_classwise_update,
    classwise_update_sums,
    decode_noise,
    encode_noise,
    pgd_minimize,
    project,
    release_uint8,
)

EPS = 8 / 255


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions are dominated by thread start-up on a small shared CPU; one thread is ~40x faster here.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = surrogates.build("small-cnn", 10, 1)
    model.eval()  # the worker runs PGD in eval mode
    return model


def _batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g)
    # Put some pixels at the box edges so the [0, 1] projection is exercised.
    x[:, :, 0, :] = 0.0
    x[:, :, -1, :] = 1.0
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def _ce(model: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model((x + delta).clamp(0, 1)), y))


# --------------------------------------------------------------------------------------------- pgd_minimize


def test_pgd_update_never_leaves_eps_ball():
    model = _tiny_model()
    x, y = _batch()
    # Start from a noise that already sits on the eps-ball's boundary in random directions.
    g = torch.Generator().manual_seed(2)
    start = project((torch.rand(x.shape, generator=g) * 2 - 1).sign() * EPS, x, EPS)
    delta = pgd_minimize(model, x, y, start, eps=EPS, step_size=EPS / 2, steps=6)
    assert delta.shape == x.shape
    assert (delta.abs() <= EPS).all()


def test_pgd_update_keeps_perturbed_image_in_unit_box():
    model = _tiny_model()
    x, y = _batch()
    delta = pgd_minimize(model, x, y, torch.zeros_like(x), eps=EPS, step_size=EPS / 2, steps=6)
    perturbed = x + delta
    assert perturbed.min() >= 0.0
    assert perturbed.max() <= 1.0
    # Pixels at 0 can only move up, pixels at 1 only down.
    assert (delta[:, :, 0, :] >= 0).all()
    assert (delta[:, :, -1, :] <= 0).all()


def test_pgd_projects_an_out_of_range_start():
    model = _tiny_model()
    x, y = _batch()
    start = torch.full_like(x, 0.5)  # far outside the eps-ball
    delta = pgd_minimize(model, x, y, start, eps=EPS, step_size=EPS / 10, steps=1)
    assert (delta.abs() <= EPS).all()
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()


def test_pgd_lowers_surrogate_loss():
    model = _tiny_model()
    x, y = _batch()
    zero = torch.zeros_like(x)
    before = _ce(model, x, zero, y)
    delta = pgd_minimize(model, x, y, zero, eps=EPS, step_size=EPS / 4, steps=5)
    after = _ce(model, x, delta, y)
    assert after < before
    assert delta.abs().max() > 0  # it actually moved


def test_pgd_moves_pixels_that_sit_exactly_at_0_and_1():
    """Digits are mostly exact 0 and 1. torch.clamp passes no gradient at its bounds, so an update that
    differentiates through the clip would leave every such pixel at zero noise (the bug that kept MNIST unprotected).
    """
    model = _tiny_model()
    x, y = _batch()
    x = (x > 0.5).to(x.dtype)  # every pixel exactly 0 or 1
    delta = pgd_minimize(model, x, y, torch.zeros_like(x), eps=EPS, step_size=EPS / 4, steps=3)
    assert (delta[x == 0] > 0).float().mean() > 0.2  # background brightened where the loss wants it
    assert (delta[x == 1] < 0).float().mean() > 0.2  # strokes darkened where the loss wants it
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
    assert _ce(model, x, delta, y) < _ce(model, x, torch.zeros_like(x), y)


def test_pgd_does_not_change_model_parameters_or_buffers():
    model = _tiny_model()
    x, y = _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pgd_minimize(model, x, y, torch.zeros_like(x), eps=EPS, step_size=EPS / 4, steps=3)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    # No parameter gradient is even computed.
    assert all(p.grad is None for p in model.parameters())


def test_pgd_restores_requires_grad_and_keeps_frozen_params_frozen():
    model = _tiny_model()
    params = list(model.parameters())
    params[0].requires_grad_(False)  # a frozen layer must stay frozen
    x, y = _batch()
    pgd_minimize(model, x, y, torch.zeros_like(x), eps=EPS, step_size=EPS / 4, steps=2)
    assert params[0].requires_grad is False
    assert all(p.requires_grad for p in params[1:])


def test_pgd_restores_requires_grad_after_an_error():
    model = _tiny_model()
    x, _ = _batch()
    bad_y = torch.full((x.shape[0],), 99, dtype=torch.long)  # out of range for 10 classes
    with pytest.raises(IndexError, match="out of bounds"):
        pgd_minimize(model, x, bad_y, torch.zeros_like(x), eps=EPS, step_size=EPS / 4, steps=1)
    assert all(p.requires_grad for p in model.parameters())


def test_pgd_returns_detached_delta_and_leaves_input_untouched():
    model = _tiny_model()
    x, y = _batch()
    start = torch.zeros_like(x)
    delta = pgd_minimize(model, x, y, start, eps=EPS, step_size=EPS / 4, steps=2)
    assert not delta.requires_grad
    assert delta.grad_fn is None
    assert torch.equal(start, torch.zeros_like(x))
    assert not x.requires_grad


def test_pgd_with_zero_steps_returns_copy_of_start():
    model = _tiny_model()
    x, y = _batch()
    start = torch.full_like(x, 0.01)
    delta = pgd_minimize(model, x, y, start, eps=EPS, step_size=EPS / 4, steps=0)
    assert torch.equal(delta, start)
    assert delta.data_ptr() != start.data_ptr()


def test_project_clamps_to_ball_and_box():
    x = torch.tensor([0.0, 0.01, 0.5, 0.99, 1.0])
    delta = torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0])
    out = project(delta, x, EPS)
    assert (out.abs() <= EPS).all()
    assert ((x + out) >= 0).all() and ((x + out) <= 1).all()
    assert out[0] == 0.0 and out[4] == 0.0
    assert torch.isclose(out[1], torch.tensor(-0.01))
    assert torch.isclose(out[2], torch.tensor(EPS))
    # Without images only the eps-ball applies.
    assert torch.equal(project(delta, None, EPS), delta.clamp(-EPS, EPS))


# --------------------------------------------------------------------------------------------- class-wise


def _classwise_setup():
    model = _tiny_model()
    x, _ = _batch(12)
    # Class 3 has no samples; classes 0, 1, 2 have 5, 4, 3.
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    g = torch.Generator().manual_seed(5)
    class_delta = (torch.rand(4, 1, 16, 16, generator=g) * 2 - 1) * EPS
    return model, x, y, class_delta


def test_classwise_counts_per_class_are_right():
    model, x, y, class_delta = _classwise_setup()
    sums, counts = classwise_update_sums(model, x, y, class_delta, eps=EPS, step_size=EPS / 4, steps=1)
    assert sums.shape == class_delta.shape
    assert counts.tolist() == [5.0, 4.0, 3.0, 0.0]
    assert counts.dtype == class_delta.dtype
    assert torch.equal(sums[3], torch.zeros_like(sums[3]))


def test_classwise_sums_are_sums_of_sample_updates():
    model, x, y, class_delta = _classwise_setup()
    sums, _ = classwise_update_sums(model, x, y, class_delta, eps=EPS, step_size=EPS / 4, steps=2)
    start = class_delta[y]
    moved = pgd_minimize(model, x, y, start, eps=EPS, step_size=EPS / 4, steps=2)
    for k in range(3):
        expected = (moved - start)[y == k].sum(0)
        assert torch.allclose(sums[k], expected, atol=1e-6)


def test_classwise_update_stays_in_eps_ball_and_leaves_empty_class_unchanged():
    model, x, y, class_delta = _classwise_setup()
    sums, counts = classwise_update_sums(model, x, y, class_delta, eps=EPS, step_size=EPS / 2, steps=3)
    new = apply_classwise_update(class_delta, sums, counts, EPS)
    assert new.shape == class_delta.shape
    assert (new.abs() <= EPS).all()
    assert torch.equal(new[3], class_delta[3])
    # Classes with samples move by the mean of their samples' updates (then projected).
    for k, n in enumerate([5, 4, 3]):
        assert torch.allclose(new[k], (class_delta[k] + sums[k] / n).clamp(-EPS, EPS), atol=1e-7)
    assert not torch.equal(new[:3], class_delta[:3])


def test_classwise_sums_from_two_batches_add_up():
    model, x, y, class_delta = _classwise_setup()
    s_all, c_all = classwise_update_sums(model, x, y, class_delta, eps=EPS, step_size=EPS / 4, steps=1)
    s1, c1 = classwise_update_sums(model, x[:7], y[:7], class_delta, eps=EPS, step_size=EPS / 4, steps=1)
    s2, c2 = classwise_update_sums(model, x[7:], y[7:], class_delta, eps=EPS, step_size=EPS / 4, steps=1)
    assert torch.equal(c1 + c2, c_all)
    assert torch.allclose(s1 + s2, s_all, atol=1e-6)


def test_apply_classwise_update_with_all_counts_zero_is_identity():
    class_delta = (torch.rand(3, 3, 4, 4) * 2 - 1) * EPS
    out = apply_classwise_update(class_delta, torch.zeros_like(class_delta), torch.zeros(3), EPS)
    assert torch.equal(out, class_delta)


def test_apply_classwise_update_clamps_large_moves():
    class_delta = torch.zeros(2, 1, 2, 2)
    sums = torch.stack([torch.full((1, 2, 2), 10.0), torch.full((1, 2, 2), -10.0)])
    out = apply_classwise_update(class_delta, sums, torch.tensor([2.0, 5.0]), EPS)
    assert torch.allclose(out[0], torch.full((1, 2, 2), EPS))
    assert torch.allclose(out[1], torch.full((1, 2, 2), -EPS))


# --------------------------------------------------------------------------------------------- release_uint8


def test_release_never_differs_by_more_than_eps_levels_including_extremes():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[0] = 0
    x[1] = 255
    x[2, :, :16] = 0
    x[2, :, 16:] = 255
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * EPS
    delta[:, :, ::2] = EPS  # exactly on the boundary
    delta[:, :, 1::4] = -EPS
    out = release_uint8(x, delta)
    assert out.dtype == torch.uint8
    assert out.shape == x.shape
    assert linf(out, x) <= round(255 * EPS) == 8


def test_release_clips_at_zero_and_255():
    x = torch.tensor([0, 255, 250, 3, 128], dtype=torch.uint8)
    delta = torch.tensor([-EPS, EPS, EPS, -EPS, 1.0])
    out = release_uint8(x, delta)
    assert out.tolist() == [0, 255, 255, 0, 255]


def test_release_keeps_negative_noise():
    # The reference zeroed every negative noise value; we must not.
    x = torch.tensor([100, 100, 100], dtype=torch.uint8)
    delta = torch.tensor([-4 / 255, 4 / 255, -8 / 255])
    assert release_uint8(x, delta).tolist() == [96, 104, 92]


def test_release_rounds_to_nearest_level():
    x = torch.tensor([10, 10, 10], dtype=torch.uint8)
    delta = torch.tensor([0.4 / 255, 0.6 / 255, -0.6 / 255])
    assert release_uint8(x, delta).tolist() == [10, 11, 9]


# --------------------------------------------------------------------------------------------- noise codec


def test_noise_codec_round_trip_error_within_half_a_level():
    g = torch.Generator().manual_seed(4)
    delta = (torch.rand(8, 3, 16, 16, generator=g) * 2 - 1) * EPS
    delta[0] = EPS
    delta[1] = -EPS
    q = encode_noise(delta, EPS)
    assert q.dtype == torch.int8
    assert q.shape == delta.shape
    assert int(q.to(torch.int16).abs().max()) <= NOISE_LEVELS == 127
    back = decode_noise(q, EPS)
    assert back.dtype == torch.float32
    assert (back - delta).abs().max() <= EPS / 127 / 2 + 1e-7
    assert (back.abs() <= EPS + 1e-7).all()
    assert torch.allclose(back[0], torch.full_like(back[0], EPS))


def test_noise_codec_clamps_out_of_ball_values():
    delta = torch.tensor([2 * EPS, -2 * EPS, 1.0, -1.0])
    q = encode_noise(delta, EPS)
    assert q.tolist() == [127, -127, 127, -127]


def test_noise_codec_round_trip_for_other_eps():
    eps = 16 / 255
    delta = torch.linspace(-eps, eps, 1001)
    back = decode_noise(encode_noise(delta, eps), eps)
    assert (back - delta).abs().max() <= eps / 127 / 2 + 1e-7


# --------------------------------------------------------------------------------------------- parse_fraction


def test_parse_fraction_reads_fractions_and_floats():
    assert parse_fraction("8/255") == pytest.approx(8 / 255)
    assert parse_fraction(" 8/255 ") == pytest.approx(8 / 255)
    assert parse_fraction("0.0313") == pytest.approx(0.0313)
    assert parse_fraction("1") == 1.0
    assert parse_fraction(0.5) == 0.5
    assert parse_fraction(2) == 2.0
    assert isinstance(parse_fraction(2), float)
    assert isinstance(parse_fraction("8/255"), float)


@pytest.mark.parametrize("text", ["abc", "", "8/", "1/0", "8//255", "eight"])
def test_parse_fraction_rejects_garbage_with_value_error(text):
    with pytest.raises(ValueError) as info:
        parse_fraction(text)
    assert repr(text) in str(info.value)


# --------------------------------------------------------------------------------------------- metrics


def test_metrics_on_known_tensors():
    a = torch.tensor([[0, 10], [20, 255]], dtype=torch.uint8)
    b = torch.tensor([[0, 13], [16, 255]], dtype=torch.uint8)
    assert linf(a, b) == 4
    assert isinstance(linf(a, b), int)
    assert l2(a, b) == pytest.approx(5 / 255)
    mse = (9 + 16) / 4
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse))


def test_linf_does_not_overflow_uint8():
    a = torch.tensor([0], dtype=torch.uint8)
    b = torch.tensor([255], dtype=torch.uint8)
    assert linf(a, b) == 255
    assert linf(b, a) == 255
    assert l2(a, b) == pytest.approx(1.0)
    assert psnr(a, b) == pytest.approx(0.0)


def test_metrics_of_identical_images():
    a = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert linf(a, a) == 0
    assert l2(a, a) == 0.0
    assert psnr(a, a) == math.inf
