"""Unit tests for ops/robust.py (``--robust on``: the inner maximisation, the EOT transforms, the robust noise step),
its place in the noise engine and the surrogate's train step, and the ``robust`` config field. Real MNIST digits and
a small CNN trained a little, so that losses mean something."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ops.countermeasures import jpeg
from ops.engine import NoiseEngine
from ops.noise import pgd_minimize
from ops.robust import (
    DEFAULT_RHO,
    TRANSFORMS,
    RobustSpec,
    apply_transform,
    eot_transform,
    inner_maximize,
    jpeg_approx,
    jpeg_tables,
    robust_adversary,
    robust_minimize,
    robust_spec,
    shift_flip,
)
from pipeline.cli import build_parser, config_from_args
from pipeline.config import HASH_FIELDS, ProtectConfig, config_hash
from surrogates import build
from surrogates.training import make_optimizer, train_step

EPS = 8 / 255
SPEC = RobustSpec()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions are dominated by thread start-up on a small shared CPU; one thread is much faster here.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """64 real MNIST digits (uint8 64 x 1 x 28 x 28, every class) and their labels."""
    from tools.mnist import load_mnist

    x, y = load_mnist()
    idx = list(range(0, len(y), len(y) // 64))[:64]  # the file is sorted by class
    return torch.from_numpy(x[idx]).unsqueeze(1).contiguous(), torch.from_numpy(y[idx])


@pytest.fixture(scope="module")
def fitted(digits) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """small-cnn trained 30 steps on the digits (it fits them, so noise and attacks move its loss), and the data.
    Batch norm's running statistics are then set to the whole batch's, so that its eval mode fits them too (after
    30 steps the running averages still lag the weights)."""
    x_uint8, y = digits
    x = x_uint8.float() / 255
    torch.manual_seed(0)
    model = build("small-cnn", 10, 1)
    opt = make_optimizer(model)
    for _ in range(30):
        train_step(model, opt, x, y)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: one pass sets them to this batch's
    with torch.no_grad():
        model(x)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return model.state_dict(), x, y


def _model(state: dict) -> torch.nn.Module:
    model = build("small-cnn", 10, 1)
    model.load_state_dict(state)
    return model.eval()


def _rgb(x: torch.Tensor) -> torch.Tensor:
    """Colour images from digits: three different digits as R, G and B."""
    n = x.shape[0] // 3
    return torch.cat([x[:n], x[n : 2 * n], x[2 * n : 3 * n]], dim=1).contiguous()


def _loss(model: torch.nn.Module, images: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(images), y))


# --------------------------------------------------------------------------------------------- the spec and config


def test_robust_spec_is_none_when_off_and_rem_like_when_on():
    assert robust_spec("off", EPS) is None
    spec = robust_spec("on", EPS)
    assert spec.rho == DEFAULT_RHO == 4 / 255 and spec.inner_steps >= 1 and set(spec.transforms) == set(TRANSFORMS)
    assert robust_spec(" On ", 4 / 255).rho == 2 / 255  # below eps: an adversary at eps could cancel the noise
    with pytest.raises(ValueError, match="--robust must be one of off, on"):
        robust_spec("yes", EPS)
    with pytest.raises(ValueError, match="robust transforms"):
        RobustSpec(transforms=("jpeg", "shear"))


def test_config_validates_canonicalises_and_hashes_robust():
    assert "robust" in HASH_FIELDS
    off = ProtectConfig(inputs=["x"], output="o").resolved()
    on = ProtectConfig(inputs=["x"], output="o", robust=" ON").resolved()
    assert (off.robust, on.robust) == ("off", "on")
    assert on.hashed_fields()["robust"] == "on" and config_hash(off, "d") != config_hash(on, "d")
    with pytest.raises(ValueError, match="^--robust must be one of off, on, not 'maybe'$"):
        ProtectConfig(inputs=["x"], output="o", robust="maybe").resolved()


def test_robust_rho_sets_the_adversary_radius_is_validated_and_hashed_only_when_set():
    """``--robust-rho`` replaces the default radius min(4/255, eps/2); it needs --robust on, lies in [0, eps], and
    enters the run's identity only when given (a run from before it existed keeps its hash)."""
    assert robust_spec("on", EPS, 2 / 255).rho == 2 / 255 and robust_spec("on", EPS, 0.0).rho == 0.0
    default = ProtectConfig(inputs=["x"], output="o", robust="on").resolved()
    assert default.robust_rho is None and "robust_rho" not in default.hashed_fields()
    two = ProtectConfig(inputs=["x"], output="o", robust="on", robust_rho="2/255").resolved()
    assert two.robust_rho == 2 / 255 and two.hashed_fields()["robust_rho"] == 2 / 255
    assert config_hash(two, "d") != config_hash(default, "d")
    with pytest.raises(ValueError, match="^--robust-rho applies to --robust on only$"):
        ProtectConfig(inputs=["x"], output="o", robust_rho="2/255").resolved()
    with pytest.raises(ValueError, match=r"^--robust-rho must be in \[0, eps\]"):
        ProtectConfig(inputs=["x"], output="o", robust="on", robust_rho="16/255").resolved()
    parser = build_parser()
    args = parser.parse_args(["protect", "--input", "in", "--output", "out", "--robust", "on", "--robust-rho", "1/255"])
    assert config_from_args(args).resolved().robust_rho == 1 / 255


def test_cli_robust_flag_reaches_the_config(capsys):
    parser = build_parser()
    base = ["protect", "--input", "in", "--output", "out"]
    assert config_from_args(parser.parse_args(base)).robust == "off"
    assert config_from_args(parser.parse_args(base + ["--robust", "on"])).robust == "on"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(base + ["--robust", "maybe"])
    assert exc.value.code == 2 and "--robust" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- the inner maximisation


def test_inner_maximization_stays_within_rho_and_raises_the_surrogate_loss(fitted):
    state, x, y = fitted
    model = _model(state)
    g = torch.Generator().manual_seed(0)
    noisy = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * EPS).clamp(0, 1)  # images already carrying noise
    delta_a = inner_maximize(model, noisy, y, spec=SPEC, generator=g)
    assert delta_a.abs().max() <= SPEC.rho + 1e-6
    assert (noisy + delta_a).min() >= 0 and (noisy + delta_a).max() <= 1
    assert all(p.grad is None for p in model.parameters())
    random_sign = SPEC.rho * torch.randint(0, 2, x.shape, generator=g).mul(2).sub(1)
    before, attacked = _loss(model, noisy, y), _loss(model, noisy + delta_a, y)
    by_chance = _loss(model, (noisy + random_sign).clamp(0, 1), y)
    assert attacked > 1.5 * before, (before, attacked)
    assert attacked - before > 3 * abs(by_chance - before)  # the attack, not any perturbation of that size
    assert torch.equal(inner_maximize(model, noisy, y, spec=RobustSpec(rho=0.0), generator=g), torch.zeros_like(x))


# --------------------------------------------------------------------------------------------- EOT transforms


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_every_eot_transform_keeps_shape_and_range_and_passes_a_gradient(digits, name, channels):
    x = digits[0].float() / 255
    x = x[:30] if channels == 1 else _rgb(x[:60])
    image = x.clone().requires_grad_(True)
    out = apply_transform(name, image, SPEC, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((out * weights).sum(), image)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    identity = name == "none" or (name == "grayscale" and channels == 1)
    assert torch.equal(out.detach(), x) == identity  # every other transform changes the images


def test_shift_flip_and_the_drawn_transform_keep_range_gradients_and_are_seeded(digits):
    x = digits[0][:16].float() / 255
    image = x.clone().requires_grad_(True)
    shifted = shift_flip(image, torch.Generator().manual_seed(0), pad=2, flip=True)
    assert shifted.shape == x.shape and not torch.equal(shifted.detach(), x)
    assert shifted.sum() <= x.sum() + 1e-4  # only zeros come in from the padding
    (grad,) = torch.autograd.grad(shifted.sum(), image)
    assert set(grad.unique().tolist()) <= {0.0, 1.0} and grad.sum() > 0  # each output pixel is one input pixel
    a = eot_transform(x, SPEC, torch.Generator().manual_seed(5))
    b = eot_transform(x, SPEC, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("quality", [10, 30, 50, 75])
def test_jpeg_approximation_is_close_to_pillows_jpeg(digits, quality):
    import io

    from PIL import Image

    gray_u8 = digits[0][:60]
    rgb_u8 = _rgb(gray_u8)
    # The tables are libjpeg's own: Pillow reads back the ones its encoder wrote.
    buf = io.BytesIO()
    Image.fromarray(rgb_u8[0].permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
    luma, chroma = jpeg_tables(quality)
    written = Image.open(io.BytesIO(buf.getvalue())).quantization
    assert luma.flatten().int().tolist() == list(written[0]) and chroma.flatten().int().tolist() == list(written[1])
    # Measured (mean |approx - Pillow| in uint8 levels, qualities 10-75): 0.09-0.15 for grayscale digits, 1.3-1.4
    # for the RGB digit composites, against 3-10 and 16-29 levels that JPEG itself moves these images.
    for images, bound in ((gray_u8, 0.5), (rgb_u8, 2.5)):
        real = jpeg(images, quality).float()
        approx = jpeg_approx(images.float() / 255, quality) * 255
        gap = float((approx - real).abs().mean())
        change = float((real - images.float()).abs().mean())
        assert gap <= bound and gap <= 0.15 * change, (gap, change)


# --------------------------------------------------------------------------------------------- the robust noise step


def _expected_robust_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, draws: int = 12
) -> float:
    """E_T max_delta_a L(f(T(clip(x + delta)) + delta_a), y), estimated over ``draws`` transforms and attacks, the
    same draws for every delta (common random numbers, so that two deltas are compared on equal terms)."""
    g = torch.Generator().manual_seed(123)
    total = 0.0
    for _ in range(draws):
        view = eot_transform((x + delta).clamp(0, 1), SPEC, g)
        total += _loss(model, view + inner_maximize(model, view, y, spec=SPEC, generator=g), y)
    return total / draws


def test_robust_minimize_stays_in_bounds_and_lowers_the_expected_transformed_loss(fitted):
    state, x, y = fitted
    model = _model(state)
    for p in model.parameters():
        p.requires_grad_(False)
    pgd = {"eps": EPS, "step_size": EPS / 10, "steps": 20}  # protect's defaults
    delta = robust_minimize(
        model, x, y, torch.zeros_like(x), spec=SPEC, generator=torch.Generator().manual_seed(0), **pgd
    )
    assert delta.abs().max() <= EPS + 1e-6
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    assert delta.abs().sum() > 0 and not delta.requires_grad
    before = _expected_robust_loss(model, x, y, torch.zeros_like(x))
    after = _expected_robust_loss(model, x, y, delta)
    plain = _expected_robust_loss(model, x, y, pgd_minimize(model, x, y, torch.zeros_like(x), **pgd))
    # Measured here: 2.53 with no noise, 2.49 with plain noise, 2.41 with robust noise. The drop is modest because
    # this surrogate never trained on transformed or attacked images (much of the loss is blur's and cutout's, which
    # no noise undoes); in a run the surrogate trains on them too (robust_adversary).
    assert after < before - 0.05 and after < plain - 0.03, (before, plain, after)


# --------------------------------------------------------------------------------------------- the engine


def test_engine_without_robust_is_still_pgd_minimize_bit_for_bit(fitted):
    state, x, y = fitted
    pgd = {"eps": EPS, "step_size": 2 / 255, "steps": 4}
    delta = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * EPS
    expected = pgd_minimize(_model(state), x, y, delta, **pgd)
    engine = NoiseEngine(_model(state), precision="fp32", channels_last=False, compile=False, robust=None, **pgd)
    assert torch.equal(engine.minimize(x, y, delta), expected)
    assert engine.describe()["robust"] is None


def test_engine_with_robust_runs_robust_minimize_seeded_and_within_bounds(fitted):
    state, x, y = fitted
    pgd = {"eps": EPS, "step_size": EPS / 5, "steps": 3}
    engine = NoiseEngine(
        _model(state), precision="fp32", channels_last=False, compile=False, robust=SPEC, seed=7, **pgd
    )
    assert engine.describe()["robust"]["rho"] == SPEC.rho
    first = engine.minimize(x, y, torch.zeros_like(x))
    model = _model(state)
    for p in model.parameters():
        p.requires_grad_(False)
    expected = robust_minimize(
        model, x, y, torch.zeros_like(x), spec=SPEC, generator=torch.Generator().manual_seed(7), **pgd
    )
    assert torch.equal(first, expected)
    assert all(p.requires_grad for p in engine.model.parameters())  # frozen for the update only
    second = engine.minimize(x, y, torch.zeros_like(x))
    assert not torch.equal(first, second)  # the generator moved on: other transforms, other starts
    engine.reseed(7)
    assert torch.equal(engine.minimize(x, y, torch.zeros_like(x)), first)
    assert first.abs().max() <= EPS + 1e-6 and (x + first).min() >= 0 and (x + first).max() <= 1


def test_a_compiled_robust_engine_pads_every_surrogate_call_to_one_batch_size(fitted, monkeypatch):
    state, x, y = fitted
    shapes = []

    def recording_compile(model, **kwargs):  # stands in for torch.compile: records the batch sizes it is called on
        def run(image):
            shapes.append(image.shape[0])
            return model(image)

        return run

    monkeypatch.setattr(torch, "compile", recording_compile)
    engine = NoiseEngine(_model(state), compile=True, robust=SPEC, eps=EPS, step_size=EPS / 5, steps=2)
    delta = engine.minimize(x[:10], y[:10], torch.zeros_like(x[:10]), pad_to=32)
    assert engine.compiled and set(shapes) == {32} and len(shapes) == 2 * (1 + SPEC.inner_steps)
    assert delta.shape == x[:10].shape and delta.abs().max() <= EPS + 1e-6


# --------------------------------------------------------------------------------------------- the train step


def _recorded_training_inputs(model: torch.nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()) if m.training else None)
    return seen


def test_train_step_without_adversary_is_unchanged(fitted):
    _, x, y = fitted
    torch.manual_seed(3)
    a, b = build("small-cnn", 10, 1), build("small-cnn", 10, 1)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = make_optimizer(a), make_optimizer(b)
    seen = _recorded_training_inputs(a)
    loss = train_step(a, opt_a, x, y, adversary=None)
    # Today's step, spelled out: train mode, cross-entropy on the batch itself, clip at 5, SGD.
    b.train()
    opt_b.zero_grad(set_to_none=True)
    expected = F.cross_entropy(b(x), y)
    expected.backward()
    torch.nn.utils.clip_grad_norm_(b.parameters(), 5.0)
    opt_b.step()
    assert loss == float(expected.detach()) and len(seen) == 1 and torch.equal(seen[0], x)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_train_step_with_the_robust_adversary_trains_on_a_perturbed_batch(fitted):
    state, x, y = fitted
    model = build("small-cnn", 10, 1)
    model.load_state_dict(state)
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    seen = _recorded_training_inputs(model)
    adversary = robust_adversary(SPEC, torch.Generator().manual_seed(0))
    train_step(model, make_optimizer(model), x, y, adversary=adversary)
    assert len(seen) == 1  # the attack's forward passes ran in eval mode; one training forward
    trained_on = seen[0]
    assert trained_on.shape == x.shape and not torch.equal(trained_on, x)
    assert trained_on.min() >= 0 and trained_on.max() <= 1
    assert model.training and all(p.requires_grad for p in model.parameters())
    # Batch norm's running statistics moved once, by the training forward only (the attack's eval passes leave them).
    reference = build("small-cnn", 10, 1)
    reference.load_state_dict(state)
    reference.train()
    with torch.no_grad():
        reference(trained_on)
    for key, value in running.items():
        assert not torch.equal(model.state_dict()[key], value), key
        assert torch.allclose(model.state_dict()[key].float(), reference.state_dict()[key].float()), key
    # The same generator seed draws the same batch (a round's train stage reruns the same).
    again = build("small-cnn", 10, 1)
    again.load_state_dict(state)
    seen_again = _recorded_training_inputs(again)
    train_step(again, make_optimizer(again), x, y, adversary=robust_adversary(SPEC, torch.Generator().manual_seed(0)))
    assert torch.equal(seen_again[0], trained_on)
