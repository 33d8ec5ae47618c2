"""The run's outcome (pipeline.outcome): _SUCCESS.json's protection record and the verdict's exit status and line."""

import logging

from pipeline.exits import EXIT_OK, EXIT_UNPROTECTED
from pipeline.outcome import PRIVATE_CONFIG, protection_record, report, success_record
from pipeline.probe import judge_battery


def _probe(accuracy: float, holds: bool) -> dict:
    return {
        "holds": holds,
        "probe_accuracy": accuracy,
        "probe_clean_accuracy": 0.97,
        "chance": 0.1,
        "threshold": 0.33,
        "arch": "resnet-mini",
        "steps": 200,
        "train_samples": 4000,
        "test_samples": 1000,
    }


def _score(countermeasure: str, accuracy: float, arch: str = "resnet-mini") -> dict:
    return {
        "countermeasure": countermeasure,
        "accuracy": accuracy,
        "early_stopped_accuracy": accuracy,
        "best_epoch": 3,
        "seconds": 1.0,
        "arch": arch,
    }


def _history(probe: dict, stop: bool) -> list[dict]:
    return [
        {"round": 0, "error": 0.2, "image_steps": 40000, "probe": None, "stop": False},
        {"round": 1, "error": 0.004, "image_steps": 40000, "probe": probe, "stop": stop},
    ]


def _success(probe: dict, battery: dict | None, labels: str = "member", stop: bool = True) -> dict:
    config = {"labels": labels, "max_rounds": 2, "inputs": ["s3://originals/x.tar"], "work_dir": "/w", "seed": 0}
    return success_record(
        config,
        {"seed": 0},
        "hash",
        "digest",
        1,
        _history(probe, stop),
        battery,
        {"input": 10, "protected": 10, "rejected": 0},
        {"train": 1.0},
    )


def test_the_release_holds_only_when_the_plain_probe_and_every_countermeasure_of_every_model_hold():
    probe = _probe(0.2, True)
    holding = judge_battery(probe, [_score("mixup:1.0", 0.25), _score("none", 0.3, "small-cnn")])
    assert protection_record(_history(probe, True)[-1], holding, "member")["holds"] is True

    broken = judge_battery(probe, [_score("mixup:1.0", 0.25), _score("at:4/255", 0.9, "small-cnn")])
    record = protection_record(_history(probe, True)[-1], broken, "member")
    assert record["holds"] is False and record["probe_holds"] is True  # the stop rule's verdict is kept apart
    assert record["worst_case"] == {"countermeasure": "at:4/255@small-cnn", "accuracy": 0.9}

    plain_broken = protection_record(_history(_probe(0.5, False), False)[-1], holding, "member")
    assert plain_broken["holds"] is False


def test_a_cluster_labelled_release_is_never_certified():
    probe = _probe(0.12, True)
    record = protection_record(_history(probe, True)[-1], judge_battery(probe, [_score("none", 0.1)]), "cluster")
    assert record["holds"] is False and record["certified"] is False and "clusters" in record["why"]


def test_the_public_record_leaves_out_where_the_originals_and_the_noise_live():
    success = _success(_probe(0.2, True), None)
    assert not set(PRIVATE_CONFIG) & set(success["config"])
    assert success["rounds"] == 2 and success["stop_reason"] == "stop_rule" and success["image_steps"] == 80000
    assert [h["probe_accuracy"] for h in success["history"]] == [None, 0.2]
    assert "s3://originals" not in str(success)


def test_the_verdict_names_the_model_and_countermeasure_that_broke_the_release(caplog):
    probe = _probe(0.2, True)
    battery = judge_battery(probe, [_score("mixup:1.0", 0.25), _score("at:4/255", 0.9, "small-cnn")])
    with caplog.at_level(logging.INFO, logger="pipeline"):
        result = report(_success(probe, battery))
    assert result.exit_code == EXIT_UNPROTECTED
    line = caplog.records[-1].getMessage()
    assert "PROTECTION DOES NOT HOLD" in line and "fresh small-cnn" in line and "90.0%" in line
    assert "under at:4/255;" in line

    with caplog.at_level(logging.INFO, logger="pipeline"):
        held = report(_success(probe, judge_battery(probe, [_score("mixup:1.0", 0.25)])))
    assert held.exit_code == EXIT_OK and "release complete" in caplog.records[-1].getMessage()


def test_a_release_that_reached_max_rounds_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="pipeline"):
        result = report(_success(_probe(0.5, False), None, stop=False))
    assert result.exit_code == EXIT_UNPROTECTED
    messages = [r.getMessage() for r in caplog.records]
    assert any("reached --max-rounds 2 without meeting the stop rule" in m for m in messages)


def test_a_release_that_holds_while_the_probe_learned_a_class_says_which(caplog):
    """Threshold 33%, clean-trained probe 97%: a class of F1 0.70 is past halfway (0.65) and is named; 0.60 is not,
    whatever its accuracy."""
    for best, warned in ((0.7, True), (0.6, False)):
        probe = {**_probe(0.2, True), "probe_best_class": {"class": 7, "f1": best, "accuracy": 0.99}}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline"):
            result = report(_success(probe, None))
        assert result.exit_code == EXIT_OK  # recorded and told, not a verdict
        assert result.success["protection"]["probe_best_class"]["class"] == 7
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(warnings) == warned and all("class 7 on clean held-out images (F1 0.70" in w for w in warnings)
    # A class vocabulary's name is told with its id.
    success = _success({**_probe(0.2, True), "probe_best_class": {"class": 1, "f1": 0.9, "accuracy": 0.9}}, None)
    success["config"]["label_names"] = ["cat", "dog"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        report(success)
    assert any("class 1 ('dog') on clean held-out images (F1 0.90" in r.getMessage() for r in caplog.records)
