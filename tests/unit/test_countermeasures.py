"""Unit tests for ops/countermeasures.py (the battery's transforms and the adversarial-training attack), the training
loop that runs them (surrogates.training.fit_epochs) and evaluate's early-stopping split. Real MNIST digits where
the test is about images."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from ops.countermeasures import (
    ALL,
    adversary,
    batch_augment,
    bit_depth_reduction,
    cutmix,
    cutout,
    equalize,
    gaussian_blur,
    grayscale,
    jpeg,
    mixup,
    parse_battery,
    parse_countermeasure,
    pgd_maximize,
    preprocess,
    ueraser,
)
from pipeline.probe import early_stopping_split
from surrogates.registry import build
from surrogates.training import fit, fit_epochs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions are dominated by thread start-up on a small shared CPU; one thread is much faster here.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """One real MNIST digit of each class (uint8 10 x 1 x 28 x 28) and its label, then 30 more digits."""
    from tools.mnist import load_mnist

    x, y = load_mnist()
    first = [int((y == k).nonzero()[0][0]) for k in range(10)]
    rest = [i for i in range(0, len(y), 157) if i not in first][:30]  # the file is sorted by class
    idx = first + rest
    return torch.from_numpy(x[idx]).unsqueeze(1).contiguous(), torch.from_numpy(y[idx])


@pytest.fixture(scope="module")
def rgb(digits) -> torch.Tensor:
    """Real colour-ish images: three different digits as the R, G and B channels (uint8 10 x 3 x 28 x 28)."""
    x, _ = digits
    return torch.cat([x[:10], x[10:20], x[20:30]], dim=1).contiguous()


# --------------------------------------------------------------------------------------------- parsing


def test_parse_gives_defaults_and_keeps_the_args_as_written():
    assert parse_countermeasure("jpeg").text == "jpeg:10" and parse_countermeasure("jpeg").value == 10
    assert parse_countermeasure("jpeg:25").value == 25
    at = parse_countermeasure("at:8/255")
    assert at.text == "at:8/255" and at.value == pytest.approx(8 / 255) and at.kind == "train"
    assert parse_countermeasure("at").value == pytest.approx(4 / 255)
    assert parse_countermeasure(" Blur:0.5 ").text == "blur:0.5"
    assert parse_countermeasure("grayscale").kind == "preprocess"
    assert parse_countermeasure("none").kind == "none"


@pytest.mark.parametrize(
    "text",
    [
        "jpg:10",
        "jpeg:0",
        "jpeg:abc",
        "jpeg:10.5",
        "jpeg:",
        "bdr:9",
        "bdr:0",
        "blur:-1",
        "at:x",
        "at:0",
        "at:2",
        "grayscale:3",
        "ueraser:1",
        "mixup:0",
        "cutout:1.5",
        "",
    ],
)
def test_bad_names_and_args_raise_one_line_value_errors(text):
    with pytest.raises(ValueError) as err:
        parse_battery([text])
    assert "\n" not in str(err.value)
    assert str(err.value)


def test_all_is_the_whole_battery_and_repeats_are_kept_once():
    battery = parse_battery(["all"])
    assert [cm.text for cm in battery] == list(ALL)
    assert {"none", "jpeg", "grayscale", "blur", "bdr", "cutout", "cutmix", "mixup", "ueraser", "at"} == {
        cm.name for cm in battery
    }
    assert [cm.text for cm in parse_battery(["none", "jpeg,mixup", "jpeg:10", "mixup:1", "at:4/255"])] == [
        "none",
        "jpeg:10",
        "mixup:1.0",
        "at:4/255",
    ]


# --------------------------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_10_changes_pixels_deterministically_and_keeps_shape(digits, rgb, channels):
    x = digits[0][:10] if channels == 1 else rgb
    out = jpeg(x, 10)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, jpeg(x, 10))
    err10 = (out.float() - x.float()).abs().mean()
    err95 = (jpeg(x, 95).float() - x.float()).abs().mean()
    assert err10 > 2 * err95 > 0  # quality 10 destroys far more than quality 95, which is close but not lossless


def test_grayscale_gives_equal_channels_of_luminance(rgb, digits):
    out = grayscale(rgb)
    assert out.shape == rgb.shape and out.dtype == torch.uint8
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    red = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    red[:, 0] = 255
    assert int(grayscale(red)[0, 0, 0, 0]) == 76  # 0.299 * 255
    assert torch.equal(grayscale(digits[0]), digits[0])  # already one channel


def test_blur_smooths_and_keeps_flat_images(digits):
    x = digits[0][:10]
    out = gaussian_blur(x, 1.0)
    assert out.shape == x.shape and out.dtype == torch.uint8

    def tv(a: torch.Tensor) -> float:
        a = a.float()
        return float((a[..., 1:, :] - a[..., :-1, :]).abs().sum() + (a[..., :, 1:] - a[..., :, :-1]).abs().sum())

    assert tv(out) < 0.7 * tv(x)
    assert tv(gaussian_blur(x, 2.0)) < tv(out)
    flat = torch.full((1, 3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(gaussian_blur(flat, 1.5), flat)


def test_bdr_2_gives_at_most_4_levels_spanning_the_range(rgb):
    out = bit_depth_reduction(rgb, 2)
    assert out.shape == rgb.shape and out.dtype == torch.uint8
    levels = set(out.unique().tolist())
    assert levels <= {0, 85, 170, 255} and {0, 255} <= levels
    assert len(bit_depth_reduction(rgb, 1).unique()) <= 2
    assert torch.equal(bit_depth_reduction(rgb, 8), rgb)
    assert torch.equal(bit_depth_reduction(out, 2), out)


def test_preprocess_dispatches_by_name_and_leaves_training_time_ones_alone(rgb):
    assert torch.equal(preprocess(parse_countermeasure("bdr:3"), rgb), bit_depth_reduction(rgb, 3))
    assert torch.equal(preprocess(parse_countermeasure("jpeg:30"), rgb), jpeg(rgb, 30))
    for name in ("none", "mixup", "cutout", "ueraser", "at"):
        assert preprocess(parse_countermeasure(name), rgb) is rgb
    for name in ("none", "jpeg", "grayscale", "blur", "bdr", "at"):
        assert batch_augment(parse_countermeasure(name), 10) is None
    assert adversary(parse_countermeasure("mixup")) is None and adversary(parse_countermeasure("at")) is not None


# --------------------------------------------------------------------------------------------- training time


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32) / 255.0


def test_cutout_zeroes_one_square_per_image_and_nothing_else(digits):
    x = torch.rand(16, 3, 20, 20) * 0.9 + 0.1  # no zeros of its own
    out = cutout(x, torch.Generator().manual_seed(0), 0.5)
    assert out.shape == x.shape
    zeroed = out == 0
    assert torch.equal(out[~zeroed], x[~zeroed])
    per_image = zeroed[:, 0].flatten(1).sum(1)
    assert (per_image <= 100).all() and (per_image > 0).all()  # a 10 x 10 square, clipped at the edges
    assert torch.equal(zeroed[:, 0], zeroed[:, 2])  # the same square in every channel
    assert torch.equal(out, cutout(x, torch.Generator().manual_seed(0), 0.5))


def test_mixup_blends_images_and_labels_by_the_same_weight(digits):
    x, y = _float(digits[0][:10]), digits[1][:10]  # ten different classes
    targets = F.one_hot(y, 10).float()
    out, mixed = mixup(x, targets, torch.Generator().manual_seed(3), 0.4)
    assert out.shape == x.shape and mixed.shape == (10, 10)
    assert torch.allclose(mixed.sum(1), torch.ones(10))
    assert ((mixed > 0).sum(1) <= 2).all()
    for i in range(10):
        lam = float(mixed[i, y[i]])
        others = [int(k) for k in (mixed[i] > 0).nonzero() if int(k) != int(y[i])]
        partner = int((y == others[0]).nonzero()[0]) if others else i
        assert torch.allclose(out[i], lam * x[i] + (1 - lam) * x[partner], atol=1e-6)


def test_cutmix_labels_follow_the_pasted_area():
    # Constant images, each a different level: every pixel says which image it came from.
    x = torch.arange(1, 11, dtype=torch.float32).div(10).view(10, 1, 1, 1).expand(10, 3, 16, 16).contiguous()
    y = torch.arange(10)
    out, mixed = cutmix(x, F.one_hot(y, 10).float(), torch.Generator().manual_seed(1), 1.0)
    assert torch.allclose(mixed.sum(1), torch.ones(10))
    for i in range(10):
        own = float((out[i] == x[i, 0, 0, 0]).float().mean())
        assert mixed[i, i] == pytest.approx(own, abs=1e-6) or mixed[i].max() == pytest.approx(1.0)


@pytest.mark.parametrize("channels", [1, 3])
def test_ueraser_changes_images_within_range_and_is_seeded(digits, rgb, channels):
    x = _float(digits[0][:10] if channels == 1 else rgb)
    out = ueraser(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.02
    assert torch.equal(out, ueraser(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, ueraser(x, torch.Generator().manual_seed(1)))


def test_equalize_stretches_low_contrast_and_keeps_flat_channels():
    x = torch.linspace(0.4, 0.6, 64).view(1, 1, 8, 8)
    out = equalize(x)
    assert out.min() == 0 and out.max() == 1
    assert (out.flatten().diff() >= 0).all()  # monotone: order of levels kept
    flat = torch.full((2, 3, 4, 4), 0.3)
    assert torch.equal(equalize(flat), flat)


def test_at_perturbation_stays_within_eps_and_increases_the_loss(digits):
    torch.manual_seed(0)
    model = build("mlp", 10, 1)  # no batch norm: its eval mode is sound after a few steps
    x, y = _float(digits[0]), digits[1]
    fit_epochs(model, digits[0], y, epochs=10, batch_size=8, seed=0)  # a model with something to attack
    model.eval()
    model.zero_grad(set_to_none=True)
    eps = 8 / 255
    adv = pgd_maximize(model, x, y, eps=eps, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    noisy = (x + eps * torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).mul(2).sub(1)).clamp(
        0, 1
    )
    with torch.no_grad():
        clean, attacked, random_noise = (F.cross_entropy(model(v), y) for v in (x, adv, noisy))
    assert attacked > 1.2 * clean
    assert attacked - clean > 3 * (random_noise - clean).abs()  # the attack, not any noise of that size


# --------------------------------------------------------------------------------------------- training loop


def test_fit_epochs_without_countermeasure_trains_the_same_weights_as_fit(digits):
    x, y = digits
    torch.manual_seed(5)
    a = fit(build("small-cnn", 10, 1), x, y, steps=2 * (40 // 16), batch_size=16, pad=2, seed=5)
    torch.manual_seed(5)
    epochs_seen = []
    b = fit_epochs(
        build("small-cnn", 10, 1),
        x,
        y,
        epochs=2,
        batch_size=16,
        pad=2,
        seed=5,
        on_epoch=lambda e, m: epochs_seen.append((e, m.training)),
    )
    assert epochs_seen == [(1, True), (2, True)]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("name", ["cutout", "cutmix", "mixup", "ueraser", "at:8/255"])
def test_fit_epochs_runs_every_training_time_countermeasure(digits, name):
    x, y = digits
    cm = parse_countermeasure(name)
    torch.manual_seed(0)
    model = fit_epochs(
        build("small-cnn", 10, 1),
        x,
        y,
        epochs=1,
        batch_size=16,
        seed=0,
        augment=batch_augment(cm, 10),
        adversary=adversary(cm),
    )
    assert not model.training
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_at_attack_does_not_move_batch_norm_running_statistics(digits):
    x, y = digits
    seen = []

    def attack(model, xb, targets, g):
        stats = [b for name, b in model.named_buffers() if name.endswith(("running_mean", "running_var"))]
        before = [b.clone() for b in stats]
        adv = pgd_maximize(model, xb, targets, eps=8 / 255, generator=g)
        seen.append(all(torch.equal(a, b) for a, b in zip(before, stats)) and model.training)
        return adv

    torch.manual_seed(0)
    model = fit_epochs(build("small-cnn", 10, 1), x, y, epochs=1, batch_size=16, seed=0, adversary=attack)
    assert seen == [True, True]
    bn = model[1]
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 2  # restored; counts only the training steps


# --------------------------------------------------------------------------------------------- early stopping


def test_early_stopping_split_is_two_disjoint_deterministic_halves_by_key():
    keys = [f"mnist-{i:05d}" for i in range(101)]
    mask = early_stopping_split(keys)
    assert mask.dtype == torch.bool and mask.shape == (101,)
    assert int(mask.sum()) == 50 and int((~mask).sum()) == 51
    assert torch.equal(mask, early_stopping_split(list(keys)))
    # The half a key falls in depends on the key, not on its position.
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    mask_shuffled = early_stopping_split(shuffled)
    half_a = {k for k, m in zip(keys, mask.tolist()) if m}
    assert half_a == {k for k, m in zip(shuffled, mask_shuffled.tolist()) if m}
    assert half_a != set(keys[:50])  # not simply the first half
    assert early_stopping_split(["a", "b"]).sum() == 1


def test_class_accuracy_is_each_class_share_of_its_images_predicted_right():
    from surrogates.training import class_accuracy

    y = torch.tensor([0, 0, 0, 0, 1, 1, 3])
    pred = torch.tensor([0, 0, 1, 3, 1, 0, 3])
    assert class_accuracy(pred, y, 4) == [0.5, 0.5, None, 1.0]  # class 2 has no test image


def test_class_f1_is_low_for_a_class_answered_for_every_image():
    from surrogates.training import class_f1

    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([2, 2, 2, 1, 2, 2])  # class 2 answered for nearly everything: its accuracy is 100%
    f1 = class_f1(pred, y, 4)
    assert f1[0] == 0.0 and f1[1] == 2 * 1 / (2 + 1) and f1[2] == 2 * 2 / (2 + 5) and f1[3] is None
