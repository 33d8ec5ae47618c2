"""Unit tests for where labels come from (``--label-key``), class names and their recorded vocabulary, and the
plan-time refusal of a corpus whose labels cannot be used."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os

import pytest
from PIL import Image

from pipeline.config import ProtectConfig, config_hash
from pipeline.estimate import estimate
from pipeline.labels import LabelSource, parse_label
from pipeline.plan import Plan, PlanError, ShardPlan, build_plan, expand_inputs
from pipeline.samples import Accepted, Rejected, SampleRules, prepare, prepare_each, released_members
from pipeline.storage import fs
from pipeline.storage.shards import RawSample, iter_samples, write_tar


def _jpg(value: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), (value, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def _shard(path, samples: list[RawSample]) -> str:
    fs.write_bytes(str(path), write_tar(samples))
    return str(path)


def _named(key: str, name, extra: dict | None = None) -> RawSample:
    """An img2dataset-like sample: the class in the JSON member's ``label``, a caption in ``.txt``."""
    meta = {"label": name, "url": f"http://example.com/{key}.jpg", **(extra or {})}
    return RawSample(key, {"jpg": _jpg(), "txt": f"a photo of {key}".encode(), "json": json.dumps(meta).encode()})


# ---------------------------------------------------------------------------------------------------- reading labels


@pytest.mark.parametrize(
    "members, key, expected",
    [
        ({"cls": b"3"}, "cls", 3),
        ({"cls": b"7\n"}, "cls", 7),
        ({"txt": b"4\n"}, "txt", 4),
        ({"label": b"5"}, "label", 5),
        ({"json": b'{"label": 2, "url": "x"}'}, "json:label", 2),
        ({"json": b'{"label": "6"}'}, "json:label", 6),
        ({"json": b'{"meta": {"class": 8}}'}, "json:meta.class", 8),
        ({"meta.json": b'{"y": 1}'}, "meta.json:y", 1),
    ],
    ids=["cls", "cls-newline", "txt", "any-extension", "json-int", "json-digit-string", "json-dotted", "other-json"],
)
def test_integer_labels_are_read_from_members_and_json_fields(members, key, expected):
    assert parse_label(members, key, 10) == expected


@pytest.mark.parametrize(
    "members, key, name",
    [
        ({"txt": b"cat\n"}, "txt", "cat"),
        ({"cls": b"dog"}, "cls", "dog"),
        ({"json": b'{"label": "digit-3"}'}, "json:label", "digit-3"),
        ({"json": b'{"meta": {"class": "chat noir"}}'}, "json:meta.class", "chat noir"),
        ({"json": '{"label": "猫"}'.encode()}, "json:label", "猫"),
    ],
    ids=["txt", "cls", "json", "json-dotted", "non-ascii"],
)
def test_class_names_map_to_their_id_in_the_vocabulary(members, key, name):
    vocabulary = sorted(["cat", "chat noir", "digit-3", "dog", "猫"])
    rules = SampleRules(len(vocabulary), 10_000, label_key=key, label_names=vocabulary)
    assert rules.label(members) == vocabulary.index(name)


def test_digits_are_names_like_any_other_in_a_name_vocabulary():
    ids = {"10": 0, "2": 1, "cat": 2}
    assert parse_label({"cls": b"2"}, "cls", None, ids) == 1
    assert parse_label({"json": b'{"label": 10}'}, "json:label", None, ids) == 0


@pytest.mark.parametrize(
    "members, key, names, error",
    [
        ({"png": b""}, "cls", None, "no label member '.cls'"),
        ({"cls": b""}, "cls", None, "not an integer"),
        ({"cls": b" 2 "}, "cls", None, "not an integer"),
        ({"cls": b"+2"}, "cls", None, "not an integer"),
        ({"cls": "３".encode()}, "cls", None, "not an integer"),
        ({"cls": b"cat"}, "cls", None, "not an integer"),
        ({"cls": b"\xff\xfe"}, "cls", None, "not valid UTF-8"),
        ({"txt": b""}, "txt", ["cat", "dog"], "is empty"),
        ({"txt": b"\n"}, "txt", ["cat", "dog"], "is empty"),
        ({"txt": b" cat"}, "txt", ["cat", "dog"], "spaces around"),
        ({"txt": b"a cat\non a mat\n"}, "txt", ["cat", "dog"], "line break"),
        ({"txt": b"x" * 300}, "txt", ["cat", "dog"], "more than a class name"),
        ({"txt": b"bird"}, "txt", ["cat", "dog"], "not in the plan's class vocabulary"),
        ({"txt": b"\xff"}, "txt", ["cat", "dog"], "not valid UTF-8"),
        ({"jpg": b""}, "json:label", None, "no JSON member '.json'"),
        ({"json": b"{not json"}, "json:label", None, "not valid JSON"),
        ({"json": b'{"url": "x"}'}, "json:label", None, "no field 'label' in '.json'"),
        ({"json": b'{"meta": 3}'}, "json:meta.class", None, "no field 'meta.class' in '.json'"),
        ({"json": b'{"label": {"a": 1}}'}, "json:label", None, "a JSON object, not an integer or a class name"),
        ({"json": b'{"label": [1, 2]}'}, "json:label", None, "a JSON list"),
        ({"json": b'{"label": null}'}, "json:label", None, "null"),
        ({"json": b'{"label": true}'}, "json:label", None, "true"),
        ({"json": b'{"label": 2.5}'}, "json:label", None, "the fraction 2.5"),
        ({"json": b'{"label": -1}'}, "json:label", None, "negative"),
        ({"json": b'{"label": 12}'}, "json:label", None, "out of range [0, 10)"),
        ({"json": b"[1, 2]"}, "json:label", None, "no field 'label'"),
    ],
)
def test_labels_that_are_neither_integer_nor_name_are_refused_with_a_reason(members, key, names, error):
    ids = {n: i for i, n in enumerate(names)} if names else None
    with pytest.raises(ValueError) as info:
        parse_label(members, key, 10, ids)
    assert error in str(info.value), str(info.value)


def test_a_bad_label_rejects_the_sample_with_its_reason_and_a_good_one_is_accepted():
    rules = SampleRules(2, 10_000, label_key="json:label", label_names=["digit-3", "digit-7"])
    good = prepare(_named("a", "digit-7"), rules, set())
    bad = prepare(_named("b", {"name": "digit-3"}), rules, set())
    assert isinstance(good, Accepted) and good.label == 1
    assert isinstance(bad, Rejected) and "field 'label' of '.json' is a JSON object" in bad.error


@pytest.mark.parametrize("spec", ["json:", "json:a..b", ":label", ".cls", "a/b"])
def test_a_malformed_label_key_is_refused(spec):
    with pytest.raises(ValueError, match="--label-key"):
        LabelSource.parse(spec)


def test_label_key_round_trips_and_names_the_field():
    source = LabelSource.parse("json:meta.class")
    assert (source.member, source.path, str(source)) == ("json", ("meta", "class"), "json:meta.class")
    assert str(LabelSource.parse("txt")) == "txt"


# ---------------------------------------------------------------------------------------------------- the vocabulary


def test_class_names_get_sorted_vocabulary_ids_recorded_in_the_plan(tmp_path):
    names = ["zebra", "ant", "moth", "ant", "zebra", "bee"]
    url = _shard(tmp_path / "00000.tar", [_named(f"k{i}", n) for i, n in enumerate(names)])
    plan = build_plan([url], None, None, "json:label")
    assert plan.label_names == ("ant", "bee", "moth", "zebra") and plan.num_classes == 4
    again = Plan.from_parquet(plan.to_parquet())
    assert again == plan and again.label_names == plan.label_names
    rules = SampleRules(plan.num_classes, 10_000, label_key="json:label", label_names=list(plan.label_names))
    got = {r.key: r.label for _, r in prepare_each(iter_samples(url), rules, 1)}
    assert got == {f"k{i}": plan.label_names.index(n) for i, n in enumerate(names)}


def test_the_vocabulary_does_not_depend_on_shard_or_sample_order(tmp_path):
    a = _shard(tmp_path / "a" / "s-0.tar", [_named("k1", "moth"), _named("k2", "ant")])
    _shard(tmp_path / "a" / "s-1.tar", [_named("k3", "bee")])
    b = _shard(tmp_path / "b" / "s-0.tar", [_named("k3", "bee")])
    _shard(tmp_path / "b" / "s-1.tar", [_named("k2", "ant"), _named("k1", "moth")])
    assert (
        build_plan([os.path.dirname(a)], None, None, "json:label").label_names
        == build_plan([os.path.dirname(b)], None, None, "json:label").label_names
        == ("ant", "bee", "moth")
    )


def test_an_all_integer_corpus_keeps_its_integers_as_ids(tmp_path):
    url = _shard(tmp_path / "s.tar", [_named("a", 0), _named("b", 7), _named("c", "3")])
    plan = build_plan([url], None, None, "json:label")
    assert plan.label_names == () and plan.num_classes == 8


def test_a_mixed_corpus_reads_every_label_digits_included_as_a_name(tmp_path, caplog):
    url = _shard(tmp_path / "s.tar", [_named("a", "2"), _named("b", 10), _named("c", "cat"), _named("d", "2")])
    with caplog.at_level(logging.WARNING, logger="pipeline.labels"):
        plan = build_plan([url], None, None, "json:label")
    assert plan.label_names == ("10", "2", "cat") and plan.num_classes == 3  # sorted as text: "10" < "2"
    assert "mix integers and class names" in caplog.text
    rules = SampleRules(plan.num_classes, 10_000, label_key="json:label", label_names=list(plan.label_names))
    assert [r.label for _, r in prepare_each(iter_samples(url), rules, 1)] == [1, 0, 2, 1]


def test_with_num_classes_labels_are_integers_and_names_are_rejected(tmp_path):
    url = _shard(tmp_path / "s.tar", [_named("a", 1), _named("b", 0), _named("c", "cat")])
    plan = build_plan([url], 4, None, "json:label")
    assert plan.label_names == () and plan.num_classes == 4
    rules = SampleRules(4, 10_000, label_key="json:label")
    results = [r for _, r in prepare_each(iter_samples(url), rules, 1)]
    assert [r.label for r in results[:2]] == [1, 0]
    assert isinstance(results[2], Rejected) and "not an integer" in results[2].error


def test_labels_of_samples_that_cannot_be_protected_do_not_enter_the_vocabulary(tmp_path):
    url = _shard(
        tmp_path / "s.tar",
        [
            _named("a", "ant"),
            _named("b", "bee"),
            RawSample("c", {"txt": b"no image", "json": b'{"label": "ghost"}'}),
            RawSample("d", {"jpg": b"not a jpeg", "json": b'{"label": "broken"}'}),
            RawSample("../e", {"jpg": _jpg(), "json": b'{"label": "escape"}'}),
            RawSample("a", {"jpg": _jpg(), "json": b'{"label": "repeat"}'}),
        ],
    )
    plan = build_plan([url], None, None, "json:label")
    assert plan.label_names == ("ant", "bee") and plan.shards[0].samples == 6


def test_the_vocabulary_changes_the_plan_digest_and_the_config_hash(tmp_path):
    one = build_plan(
        [_shard(tmp_path / "a" / "s.tar", [_named("a", "ant"), _named("b", "bee")])], None, None, "json:label"
    )
    other = build_plan(
        [_shard(tmp_path / "b" / "s.tar", [_named("a", "ant"), _named("b", "bug")])], None, None, "json:label"
    )
    same_shape = Plan(one.shards, one.num_classes, one.channels, other.label_names)
    assert same_shape.digest != one.digest
    integers = Plan(one.shards, one.num_classes, one.channels)
    assert integers.digest not in (one.digest, same_shape.digest)
    cfg = ProtectConfig(inputs=["x.tar"], output="/out", label_key="json:label")
    assert config_hash(cfg, one.digest) != config_hash(cfg, same_shape.digest)


def test_integer_plans_keep_the_digest_they_had_before_class_names():
    """An integer-labelled plan hashes as before, so runs made before class names existed still resume."""
    plan = Plan((ShardPlan("s", "/d/s.tar", 3),), 10, 1)
    assert plan.digest == hashlib.sha256(b"s\t/d/s.tar\t3\n10\t1").hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- plan refusals


def _img2dataset_without_cls(tmp_path) -> str:
    folder = tmp_path / "i2d"
    _shard(folder / "00000.tar", [_named(f"{i:09d}", "cat" if i % 2 else "dog") for i in range(4)])
    (folder / "00000.parquet").write_bytes(b"PAR1 not a shard")
    (folder / "00000_stats.json").write_text('{"count": 4}')
    return str(folder)


def test_no_usable_label_is_refused_at_plan_time_naming_the_members_and_what_to_pass(tmp_path):
    folder = _img2dataset_without_cls(tmp_path)
    for num_classes in (None, 10):
        with pytest.raises(PlanError) as info:
            build_plan([folder], num_classes, None, "cls")
        text = str(info.value)
        assert "\n" not in text
        assert text.startswith("no sample has a usable label under --label-key cls (no label member '.cls')")
        assert "samples have members jpg, json, txt" in text
        assert "--label-key json:FIELD (fields seen: label, url)" in text and "--label-key txt" in text


def test_a_missing_json_field_is_refused_naming_the_fields_seen(tmp_path):
    with pytest.raises(PlanError, match=r"no field 'class' in '\.json'.*fields seen: label, url"):
        build_plan([_img2dataset_without_cls(tmp_path)], None, None, "json:class")


def test_num_classes_below_the_largest_label_is_refused_at_plan_time(tmp_path):
    url = _shard(tmp_path / "s.tar", [_named("a", 0), _named("b", 9), _named("c", 4)])
    with pytest.raises(PlanError) as info:
        build_plan([url], 5, None, "json:label")
    text = str(info.value)
    assert "\n" not in text
    assert text == (
        "--num-classes 5 is too small: the largest label under --label-key json:label is 9; pass "
        "--num-classes 10 or more, or leave it out (default: the largest label + 1)"
    )
    assert build_plan([url], 10, None, "json:label").num_classes == 10


def test_num_classes_with_only_class_names_is_refused_saying_to_drop_it(tmp_path):
    url = _shard(tmp_path / "s.tar", [_named("a", "cat"), _named("b", "dog")])
    with pytest.raises(PlanError, match="drop --num-classes"):
        build_plan([url], 2, None, "json:label")


def test_a_single_class_name_is_refused(tmp_path):
    url = _shard(tmp_path / "s.tar", [_named("a", "cat"), _named("b", "cat")])
    with pytest.raises(PlanError, match="at least 2 classes.*one class name \\('cat'\\)"):
        build_plan([url], None, None, "json:label")


def test_a_malformed_label_key_is_a_plan_error(tmp_path):
    url = _shard(tmp_path / "s.tar", [_named("a", "cat")])
    with pytest.raises(PlanError, match="--label-key 'json:'"):
        build_plan([url], None, None, "json:")


def test_dry_run_runs_the_same_plan_and_shows_the_label_ids(tmp_path):
    url = _shard(tmp_path / "s.tar", [_named("a", "dog"), _named("b", "cat")])
    out = estimate(ProtectConfig(inputs=[url], output=str(tmp_path / "out"), label_key="json:label"))
    assert out["plan"]["classes"] == 2
    assert out["plan"]["labels"] == {"kind": "class names", "first_ids": {"cat": 0, "dog": 1}}
    with pytest.raises(PlanError, match="no sample has a usable label"):
        estimate(ProtectConfig(inputs=[url], output=str(tmp_path / "out")))


# ---------------------------------------------------------------------------------------------------- img2dataset


def test_an_img2dataset_folder_gives_only_its_tar_shards(tmp_path):
    folder = _img2dataset_without_cls(tmp_path)
    _shard(tmp_path / "i2d" / "00001.tar", [_named("x", "cat")])
    (tmp_path / "i2d" / "00001.parquet").write_bytes(b"PAR1")
    (tmp_path / "i2d" / "00001_stats.json").write_text("{}")
    assert expand_inputs([folder]) == [f"{folder}/00000.tar", f"{folder}/00001.tar"]


def test_json_and_txt_members_pass_through_unchanged_into_the_release():
    sample = _named("k", "cat")
    out = released_members(sample, b"PNG", "jpg")
    assert out == {"png": b"PNG", "txt": sample.members["txt"], "json": sample.members["json"]}
