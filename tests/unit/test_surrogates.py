"""Unit tests for surrogates/: the model registry, the training step, prediction and checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import surrogates
from surrogates.registry import available, build
from surrogates.training import (
    OptimConfig,
    load_checkpoint,
    make_optimizer,
    predict,
    save_checkpoint,
    train_step,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convolutions are dominated by thread start-up on a small shared CPU; one thread is much faster here.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# --------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_expected_models_with_notes():
    names = available()
    assert {"small-cnn", "mlp", "resnet18", "resnet-mini", "resnet18-imagenet"} <= set(names)
    assert all(isinstance(note, str) and note for note in names.values())
    assert surrogates.available() == names
    # The returned dict is a copy: mutating it does not change the registry.
    names.pop("small-cnn")
    assert "small-cnn" in available()


@pytest.mark.parametrize("name", sorted(available()))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_every_model_builds_and_gives_logits_at_28_and_32(name, in_channels):
    torch.manual_seed(0)
    model = build(name, 7, in_channels)
    assert isinstance(model, torch.nn.Module)
    model.eval()
    with torch.no_grad():
        for size in (28, 32):
            out = model(torch.rand(2, in_channels, size, size))
            assert out.shape == (2, 7)
            assert out.dtype == torch.float32
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(available()))
def test_every_model_trains_in_train_mode_on_batch_of_two(name):
    torch.manual_seed(0)
    model = build(name, 5, 3)
    opt = make_optimizer(model)
    loss = train_step(model, opt, torch.rand(2, 3, 28, 28), torch.tensor([0, 4]))
    assert isinstance(loss, float)
    assert not math.isnan(loss)


def test_build_is_reproducible_under_the_same_seed():
    torch.manual_seed(123)
    a = build("small-cnn", 10, 3)
    torch.manual_seed(123)
    b = build("small-cnn", 10, 3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_unknown_model_name_raises_value_error_naming_choices():
    with pytest.raises(ValueError) as info:
        build("no-such-model", 10, 3)
    msg = str(info.value)
    assert "no-such-model" in msg
    for name in available():
        assert name in msg


# --------------------------------------------------------------------------------------------- training


def _tiny_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(16, 1, 16, 16, generator=g)
    y = torch.arange(16) % 4
    return x, y


def test_make_optimizer_uses_design_defaults():
    torch.manual_seed(0)
    model = build("small-cnn", 4, 1)
    opt = make_optimizer(model)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    cfg = OptimConfig()
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 5e-4)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.grad_clip) == (0.1, 0.9, 5e-4, 5.0)
    assert len(group["params"]) == len(list(model.parameters()))


def test_train_step_returns_float_and_lowers_loss_on_fixed_batch():
    torch.manual_seed(0)
    model = build("small-cnn", 4, 1)
    opt = make_optimizer(model)
    x, y = _tiny_batch()
    losses = [train_step(model, opt, x, y) for _ in range(20)]
    assert all(isinstance(v, float) for v in losses)
    assert min(losses[-5:]) < 0.5 * losses[0]
    assert model.training  # train_step trains in train mode


def test_train_step_changes_parameters():
    torch.manual_seed(0)
    model = build("small-cnn", 4, 1)
    opt = make_optimizer(model)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _tiny_batch()
    train_step(model, opt, x, y)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_train_step_calls_all_reduce_on_gradients_before_clipping():
    torch.manual_seed(0)
    model = build("small-cnn", 4, 1)
    opt = make_optimizer(model)
    seen = []

    def all_reduce(grads):
        seen.append(len(grads))
        assert all(isinstance(g, torch.Tensor) for g in grads)
        for g in grads:
            g.mul_(1e6)  # huge gradients: clipping must still apply afterwards

    x, y = _tiny_batch()
    train_step(model, opt, x, y, grad_clip=5.0, all_reduce=all_reduce)
    assert seen == [len(list(model.parameters()))]
    total = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total <= 5.0 * (1 + 1e-4)


def test_predict_returns_long_labels_in_eval_mode():
    torch.manual_seed(0)
    model = build("small-cnn", 4, 1)
    model.train()
    x, _ = _tiny_batch()
    labels = predict(model, x, batch_size=5)  # several batches, last one short
    assert labels.dtype == torch.long
    assert labels.shape == (16,)
    assert ((labels >= 0) & (labels < 4)).all()
    assert not model.training
    with torch.no_grad():
        assert torch.equal(labels, model(x).argmax(1))


def test_predict_on_empty_input_returns_empty_long():
    torch.manual_seed(0)
    model = build("small-cnn", 4, 1)
    out = predict(model, torch.zeros(0, 1, 16, 16))
    assert out.dtype == torch.long
    assert out.shape == (0,)


# --------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trips_weights_optimizer_and_generator():
    x, y = _tiny_batch()
    torch.manual_seed(0)
    model = build("small-cnn", 4, 1)
    opt = make_optimizer(model)
    for _ in range(3):  # momentum buffers exist
        train_step(model, opt, x, y)
    gen = torch.Generator().manual_seed(42)
    torch.randint(0, 1000, (5,), generator=gen)  # advance it away from the seed
    data = save_checkpoint(model, opt, gen)
    assert isinstance(data, bytes)

    saved_weights = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    # What the original would do next: the generator's next numbers and one more training step.
    expected_numbers = torch.randint(0, 1_000_000, (8,), generator=gen)
    train_step(model, opt, x, y)
    expected_after_step = copy.deepcopy(model.state_dict())

    torch.manual_seed(99)  # a different fresh model, optimizer and generator
    model2 = build("small-cnn", 4, 1)
    opt2 = make_optimizer(model2)
    gen2 = torch.Generator().manual_seed(7)
    load_checkpoint(data, model2, opt2, gen2)

    for k, v in saved_weights.items():
        assert torch.equal(model2.state_dict()[k], v), k
    loaded_opt = opt2.state_dict()
    assert loaded_opt["param_groups"] == saved_opt["param_groups"]
    assert saved_opt["state"].keys() == loaded_opt["state"].keys()
    assert len(loaded_opt["state"]) > 0
    for idx, st in saved_opt["state"].items():
        assert torch.equal(loaded_opt["state"][idx]["momentum_buffer"], st["momentum_buffer"])

    assert torch.equal(torch.randint(0, 1_000_000, (8,), generator=gen2), expected_numbers)

    train_step(model2, opt2, x, y)
    for k, v in expected_after_step.items():
        assert torch.allclose(model2.state_dict()[k].float(), v.float(), atol=1e-6), k


def test_checkpoint_restores_global_torch_rng():
    torch.manual_seed(0)
    model = build("small-cnn", 4, 1)
    opt = make_optimizer(model)
    torch.manual_seed(5)
    data = save_checkpoint(model, opt, None)
    expected = torch.rand(4)
    torch.rand(100)
    load_checkpoint(data, model, opt, None)
    assert torch.equal(torch.rand(4), expected)


def test_checkpoint_without_generator_leaves_given_generator_alone():
    torch.manual_seed(0)
    model = build("small-cnn", 4, 1)
    opt = make_optimizer(model)
    data = save_checkpoint(model, opt, None)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    load_checkpoint(data, model, opt, gen)
    assert torch.equal(gen.get_state(), state)
