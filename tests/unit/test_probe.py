"""The protection probe and its countermeasure battery: training under a countermeasure, early stopping, verdicts."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ProtectConfig, probe_archs, probe_battery
from pipeline.probe import holdout_mask, judge, judge_battery, probe_sample, probe_score


def _data(n: int = 160, seed: int = 0) -> dict:
    """Two classes a probe learns at once (dark and bright 8-px images), released == clean."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand(n, 1, 8, 8, generator=g) * 60 + 40 + 120 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    return {"released": x, "clean": x, "labels": y, "keys": [f"k{i}" for i in range(n)]}


@pytest.mark.parametrize("countermeasure", ["none", "mixup", "at:4/255", "jpeg:10", "grayscale"])
def test_probe_trains_under_a_countermeasure_and_reports_final_and_early_stopped(countermeasure):
    out = probe_score(
        _data(),
        "released",
        arch="small-cnn",
        steps=6,
        num_classes=2,
        seed=0,
        countermeasure=countermeasure,
        batch_size=32,
    )
    assert out["countermeasure"] == (
        countermeasure if ":" in countermeasure or countermeasure in ("none", "grayscale") else f"{countermeasure}:1.0"
    )
    assert 0 <= out["accuracy"] <= 1 and 0 <= out["early_stopped_accuracy"] <= 1
    assert 1 <= out["best_epoch"] <= 2  # 6 steps of 4 per epoch (128 training samples / 32): rounded to 2 epochs
    assert out["accuracy"] > 0.9, out  # the classes are trivially separable: every recipe learns them


def test_probe_steps_round_to_whole_epochs_and_the_plain_probe_is_reproducible():
    a = probe_score(_data(), "released", arch="small-cnn", steps=8, num_classes=2, seed=3, batch_size=32)
    b = probe_score(_data(), "released", arch="small-cnn", steps=8, num_classes=2, seed=3, batch_size=32)
    assert a["accuracy"] == b["accuracy"] and a["early_stopped_accuracy"] == b["early_stopped_accuracy"]


def test_the_probe_records_each_class_accuracy_and_the_best_class():
    scored = probe_score(_data(), "released", arch="small-cnn", steps=8, num_classes=2, seed=3, batch_size=32)
    by_class = [a for a in scored["class_accuracy"] if a is not None]
    assert len(scored["class_accuracy"]) == 2 and by_class
    assert min(by_class) <= scored["accuracy"] <= max(by_class)  # the overall accuracy is their weighted mean
    assert len(scored["class_f1"]) == 2
    # The best class is the one of highest F1, not of highest accuracy: a probe answering class 1 for nearly every
    # image has class 1's accuracy near 100% but a low F1.
    scored = {**scored, "class_accuracy": [0.7, 0.95], "class_f1": [0.8, 0.6]}
    record = judge(scored, 0.9, arch="small-cnn", steps=8, threshold=None, margin=0.25)
    assert record["probe_best_class"] == {"class": 0, "f1": 0.8, "accuracy": 0.7}
    assert record["probe_class_accuracy"] == [0.7, 0.95] and record["probe_class_f1"] == [0.8, 0.6]
    assert "probe_best_class" not in _probe()  # a score without classes (a previous version's) records none


def _probe(threshold_inputs=(0.9, 0.1)) -> dict:
    clean, chance = threshold_inputs
    released = {
        "accuracy": 0.15,
        "early_stopped_accuracy": 0.2,
        "chance": chance,
        "train_samples": 8,
        "test_samples": 2,
        "seconds": 1.0,
    }
    return judge(released, clean, arch="resnet-mini", steps=10, threshold=None, margin=0.25)


def _result(name: str, final: float, early: float) -> dict:
    return {"countermeasure": name, "accuracy": final, "early_stopped_accuracy": early, "best_epoch": 2, "seconds": 1.0}


def test_the_battery_holds_only_when_every_countermeasure_holds_final_and_early_stopped():
    probe = _probe()  # threshold 0.1 + 0.25 * 0.8 = 0.3
    assert probe["threshold"] == 0.3 and probe["holds"]
    ok = judge_battery(probe, [_result("none", 0.15, 0.2), _result("mixup:1.0", 0.25, 0.1)])
    assert ok["holds"] and ok["worst_case"] == {"countermeasure": "mixup:1.0", "accuracy": 0.25}
    early = judge_battery(probe, [_result("none", 0.15, 0.45), _result("mixup:1.0", 0.25, 0.1)])
    assert not early["holds"] and not early["countermeasures"]["none"]["holds"]
    assert early["worst_case"] == {"countermeasure": "none", "accuracy": 0.45}
    at = judge_battery(probe, [_result("none", 0.15, 0.2), _result("at:4/255", 0.96, 0.97)])
    assert not at["holds"] and at["countermeasures"]["at:4/255"]["worst"] == 0.97


def test_another_probe_arch_is_recorded_as_name_at_arch_and_judged_by_the_same_threshold():
    """With ``--probe-arch resnet-mini,small-cnn`` the battery holds only when small-cnn's scores hold too: a release
    that fools the first model and not the second does not hold, and its worst case names the second."""
    probe = _probe()  # resnet-mini; threshold 0.3
    other = [
        {**_result("none", 0.58, 0.7), "arch": "small-cnn"},
        {**_result("mixup:1.0", 0.2, 0.2), "arch": "small-cnn"},
    ]
    battery = judge_battery(
        probe, [_result("none", 0.18, 0.2), {**_result("mixup:1.0", 0.2, 0.25), "arch": "resnet-mini"}, *other]
    )
    assert list(battery["countermeasures"]) == ["none", "mixup:1.0", "none@small-cnn", "mixup:1.0@small-cnn"]
    assert [c["holds"] for c in battery["countermeasures"].values()] == [True, True, False, True]
    assert not battery["holds"] and battery["worst_case"] == {"countermeasure": "none@small-cnn", "accuracy": 0.7}


def test_probe_arch_lists_are_validated_and_canonical():
    cfg = ProtectConfig(inputs=["x"], output="o", probe_arch=" resnet-mini, small-cnn,resnet-mini").resolved()
    assert cfg.probe_arch == "resnet-mini,small-cnn" and probe_archs(cfg.probe_arch) == ["resnet-mini", "small-cnn"]
    assert ProtectConfig(inputs=["x"], output="o").resolved().hashed_fields()["probe_arch"] == "resnet-mini,small-cnn"
    with pytest.raises(ValueError, match="unknown model 'no-such'"):
        ProtectConfig(inputs=["x"], output="o", probe_arch="resnet-mini,no-such").resolved()
    with pytest.raises(ValueError, match="--probe-arch names no model"):
        ProtectConfig(inputs=["x"], output="o", probe_arch=" , ").resolved()


def test_a_probe_that_cannot_learn_clean_data_never_certifies_a_countermeasure():
    blind = _probe((0.1, 0.1))  # clean at chance: threshold 0.1, the probe cannot see protection
    battery = judge_battery(blind, [_result("none", 0.05, 0.05)])
    assert not blind["holds"] and not battery["holds"]


def test_probe_countermeasures_are_validated_canonical_and_hashed():
    cfg = ProtectConfig(inputs=["x"], output="o", probe_countermeasures="at, mixup:0.5,none").resolved()
    assert cfg.probe_countermeasures == "at:4/255,mixup:0.5,none"
    assert (
        ProtectConfig(inputs=["x"], output="o", probe_countermeasures="none").resolved().probe_countermeasures == "none"
    )
    assert "probe_countermeasures" in cfg.hashed_fields()
    assert probe_battery("none") == [] and probe_battery("all")[:2] == ["none", "jpeg:10"]
    with pytest.raises(ValueError, match="unknown countermeasure"):
        ProtectConfig(inputs=["x"], output="o", probe_countermeasures="mixup,shear").resolved()


def test_the_probe_sample_is_a_share_of_the_keys_by_hash_whatever_their_order_or_split():
    keys = [f"photo-{i:06d}" for i in range(20_000)]
    chosen = probe_sample(keys, 0.25)
    # About a quarter (binomial: 5,000 +- 61), the same keys in any order or partition (workers, shards).
    assert abs(int(chosen.sum()) - 5_000) < 300
    assert torch.equal(torch.cat([probe_sample(keys[:7_000], 0.25), probe_sample(keys[7_000:], 0.25)]), chosen)
    picked = {k for k, c in zip(keys, chosen.tolist()) if c}
    assert picked == {k for k, c in zip(keys[::-1], probe_sample(keys[::-1], 0.25).tolist()) if c}
    # A smaller share is a subset of a larger one, and the held-out fifth keeps its share inside the sample.
    assert not (probe_sample(keys, 0.1) & ~chosen).any()
    held = holdout_mask([k for k in keys if k in picked])
    assert abs(held.float().mean().item() - 0.2) < 0.02
    assert probe_sample(keys, 1.0).all() and probe_sample(keys, 3.0).all()


def test_probe_samples_is_validated_and_hashed_only_when_set_away_from_the_default():
    from pipeline.config import DEFAULT_PROBE_SAMPLES

    default = ProtectConfig(inputs=["x"], output="o").resolved()
    assert default.probe_samples == DEFAULT_PROBE_SAMPLES and "probe_samples" not in default.hashed_fields()
    assert ProtectConfig(inputs=["x"], output="o", probe_samples=500).resolved().hashed_fields()["probe_samples"] == 500
    with pytest.raises(ValueError, match="--probe-samples"):
        ProtectConfig(inputs=["x"], output="o", probe_samples=5).resolved()
