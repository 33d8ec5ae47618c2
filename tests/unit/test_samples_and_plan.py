"""Unit tests for sample validation (samples), the frozen plan (plan), the run config (config) and the bundled MNIST
shards (mnist); make-shards has its own file (test_make_shards.py)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re

import numpy as np
import pytest
from conftest import raw_tar
from PIL import Image

from pipeline.config import HASH_FIELDS, ProtectConfig, config_hash, differing_fields
from pipeline.plan import Plan, PlanError, ShardPlan, build_plan, expand_inputs
from pipeline.samples import (
    Accepted,
    Rejected,
    SampleRules,
    ordered_map,
    prepare,
    prepare_each,
    released_members,
    reread,
)
from pipeline.storage import fs
from pipeline.storage.shards import RawSample, ShardReadError, iter_samples, write_tar
from tools import mnist

# ---------------------------------------------------------------------------------------------------- helpers


def _img_bytes(mode: str = "L", size: tuple[int, int] = (6, 5), value: int = 7, fmt: str = "PNG") -> bytes:
    color = value if mode == "L" else (value, 2 * value % 256, 3 * value % 256)[: len(mode)]
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def _shard(path, samples: list[RawSample]) -> str:
    fs.write_bytes(str(path), write_tar(samples))
    return str(path)


def _rules(**kw) -> SampleRules:
    return SampleRules(**{"num_classes": 10, "max_pixels": 10_000, **kw})


def _cfg(**kw) -> ProtectConfig:
    return ProtectConfig(**{"inputs": ["/in/s-{000000..000001}.tar"], "output": "/out", **kw})


# ---------------------------------------------------------------------------------------------------- samples


@pytest.mark.parametrize("threads", [1, 3])
def test_prepare_each_on_threads_is_prepare_in_shard_order(threads):
    """Repeated keys, truncation, bad images and labels, a read error: on threads the outcome is the sequential one."""
    items = []
    for i in range(40):
        members = {"png": _img_bytes(value=i, size=(6 + i % 5, 5)), "cls": str(i % 10).encode()}
        if i % 7 == 3:
            members["png"] = b"not an image"
        if i % 11 == 5:
            members["cls"] = b"x"
        items.append(RawSample(f"k{i % 30:03d}", members, truncated=(i == 39)))  # keys 0-9 repeat once
    items.insert(20, ShardReadError("cut"))
    seen: set[str] = set()
    expected = [it if isinstance(it, ShardReadError) else prepare(it, _rules(), seen) for it in items]
    got = [outcome for _, outcome in prepare_each(iter(items), _rules(), threads)]
    assert [type(o) for o in got] == [type(o) for o in expected]
    for a, b in zip(got, expected):
        assert vars(a).keys() == vars(b).keys()
        for name in vars(a):
            x, y = getattr(a, name), getattr(b, name)
            assert x.color.equal(y.color) if name == "image" else x == y, (name, x, y)
    assert sum(isinstance(o, Accepted) for o in got) > 10 and sum(isinstance(o, Rejected) for o in got) > 10


def _reread_items() -> list:
    items = [RawSample(f"k{i}", {"png": _img_bytes(value=i), "cls": b"3"}) for i in range(6)]
    items[2].members["png"] = b"not an image"  # rejected: passes with no index
    items.insert(4, ShardReadError("cut"))
    return items


def test_reread_numbers_the_accepted_samples_and_passes_the_rest():
    got = list(reread("s", iter(_reread_items()), ["k0", "k1", "k3", "k4", "k5"], _rules(), 2))
    assert [(type(r).__name__, i) for _, r, i in got] == [
        ("Accepted", 0),
        ("Accepted", 1),
        ("Rejected", None),
        ("Accepted", 2),
        ("ShardReadError", None),
        ("Accepted", 3),
        ("Accepted", 4),
    ]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["k0", "k1", "k3", "k5", "k4"], "changed since it was loaded (sample k4)"),  # out of place
        (["k0", "k1", "k3", "k4"], "changed since it was loaded (sample k5)"),  # one more than loaded
        (["k0", "k1", "k3", "k4", "k5", "k6"], "changed since it was loaded: 5 of 6 samples found"),  # one fewer
    ],
)
def test_reread_refuses_a_shard_that_changed_since_it_was_loaded(keys, message):
    with pytest.raises(RuntimeError, match=re.escape(f"shard s {message}")):
        list(reread("s", iter(_reread_items()), keys, _rules(), 1))


def test_ordered_map_keeps_order_bounds_in_flight_and_raises():
    import threading
    import time as _time

    live, peak, lock = [0], [0], threading.Lock()

    def slow_square(x: int) -> int:
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        _time.sleep(0.002 * (x % 3))
        with lock:
            live[0] -= 1
        return x * x

    assert list(ordered_map(slow_square, range(50), threads=4, chunk=3, depth=2)) == [x * x for x in range(50)]
    assert 1 < peak[0] <= 4
    with pytest.raises(ZeroDivisionError):
        list(ordered_map(lambda x: 1 // (x - 7), range(20), threads=3))


def test_prepare_accepts_a_png_with_a_label():
    png = _img_bytes("L", (6, 5))
    result = prepare(RawSample("k1", {"png": png, "cls": b"3\n"}), _rules(), set())
    assert isinstance(result, Accepted)
    assert (result.key, result.label, result.image_member) == ("k1", 3, "png")
    assert (result.image.width, result.image.height) == (6, 5)
    assert result.image.color.shape[0] == 1  # grayscale stays one channel
    assert result.source_sha256 == hashlib.sha256(png).hexdigest()


def test_prepare_accepts_a_jpg_when_there_is_no_png():
    result = prepare(RawSample("k", {"jpg": _img_bytes("RGB", fmt="JPEG"), "cls": b"1"}), _rules(), set())
    assert isinstance(result, Accepted) and result.image_member == "jpg"
    assert result.image.color.shape[0] == 3


@pytest.mark.parametrize(
    "members, error",
    [
        ({"cls": b"1", "txt": b"hello"}, "no image member"),
        ({"png": "PNG"}, "no label member '.cls'"),
        ({"png": "PNG", "cls": b"three"}, "not an integer"),
        ({"png": "PNG", "cls": b"1.0"}, "not an integer"),
        ({"png": "PNG", "cls": b"10"}, "out of range"),
        ({"png": "PNG", "cls": b"-1"}, "not an integer"),
        ({"png": "PNG", "cls": b" 2 \n"}, "not an integer"),
        ({"png": "PNG", "cls": "３".encode()}, "not an integer"),
        ({"png": "PNG", "cls": "٣".encode()}, "not an integer"),
        ({"png": "PNG", "cls": b"0_3"}, "not an integer"),
        ({"png": "PNG", "cls": b"+2"}, "not an integer"),
        ({"png": b"\x89PNG\r\n\x1a\n garbage", "cls": b"1"}, "undecodable"),
        ({"png": b"", "cls": b"1"}, "empty"),
        ({"png": "BIG", "cls": b"1"}, "max-pixels"),
    ],
    ids=[
        "no-image",
        "missing-label",
        "text-label",
        "float-label",
        "label-too-big",
        "negative-label",
        "spaces-around-label",
        "fullwidth-digit",
        "arabic-indic-digit",
        "underscore-label",
        "plus-label",
        "undecodable",
        "empty-image",
        "over-max-pixels",
    ],
)
def test_prepare_rejects_with_a_clear_error(members, error):
    members = dict(members)
    if members.get("png") == "PNG":
        members["png"] = _img_bytes()
    elif members.get("png") == "BIG":
        members["png"] = _img_bytes(size=(101, 100))  # 10,100 pixels > max_pixels 10,000
    result = prepare(RawSample("bad", members), _rules(), set())
    assert isinstance(result, Rejected)
    assert result.key == "bad"
    assert error in result.error, result.error


def test_prepare_rejection_keeps_label_and_source_hash_when_known():
    png = _img_bytes(size=(101, 100))
    result = prepare(RawSample("big", {"png": png, "cls": b"4"}), _rules(), set())
    assert isinstance(result, Rejected)
    assert result.label == 4 and result.source_sha256 == hashlib.sha256(png).hexdigest()


def test_prepare_rejects_a_repeated_key_and_accepts_the_first():
    seen: set[str] = set()
    first = prepare(RawSample("dup", {"png": _img_bytes(value=1), "cls": b"1"}), _rules(), seen)
    other = prepare(RawSample("other", {"png": _img_bytes(value=2), "cls": b"2"}), _rules(), seen)
    second = prepare(RawSample("dup", {"png": _img_bytes(value=3), "cls": b"3"}), _rules(), seen)
    assert isinstance(first, Accepted) and first.label == 1
    assert isinstance(other, Accepted)
    assert isinstance(second, Rejected) and "repeated" in second.error


def test_prepare_image_key_selects_the_member():
    members = {"seg.png": _img_bytes("RGB", (3, 2)), "cls": b"2"}
    result = prepare(RawSample("k", members), _rules(image_key="seg.png"), set())
    assert isinstance(result, Accepted)
    assert result.image_member == "seg.png"
    assert (result.image.width, result.image.height, result.image.color.shape[0]) == (3, 2, 3)


def test_prepare_image_key_missing_is_rejected_naming_it():
    result = prepare(RawSample("k", {"png": _img_bytes(), "cls": b"2"}), _rules(image_key="img"), set())
    assert isinstance(result, Rejected) and "'.img'" in result.error


def test_prepare_label_key_selects_the_label_member():
    result = prepare(RawSample("k", {"png": _img_bytes(), "label": b"5"}), _rules(label_key="label"), set())
    assert isinstance(result, Accepted) and result.label == 5


def test_released_members_drops_other_images_and_keeps_other_members_byte_identical():
    meta = json.dumps({"caption": "a digit", "ü": 1}).encode()
    sample = RawSample(
        "k",
        {
            "png": _img_bytes(),
            "jpg": _img_bytes("RGB", fmt="JPEG"),
            "seg.png": _img_bytes(),
            "cls": b"3",
            "json": meta,
            "txt": b"\x00\xffraw",
        },
    )
    out = released_members(sample, b"PROTECTED", "png")
    assert out == {"png": b"PROTECTED", "cls": b"3", "json": meta, "txt": b"\x00\xffraw"}


def test_released_members_of_a_jpg_sample_holds_the_protected_png_only():
    sample = RawSample("k", {"jpg": _img_bytes("RGB", fmt="JPEG"), "cls": b"3"})
    assert released_members(sample, b"P", "jpg") == {"png": b"P", "cls": b"3"}


def test_released_members_drops_the_image_key_member():
    """With --image-key naming a member without an image extension, the unprotected original must not be released."""
    original = _img_bytes("RGB")
    sample = RawSample("k", {"img": original, "cls": b"1"})
    accepted = prepare(sample, _rules(image_key="img"), set())
    assert isinstance(accepted, Accepted) and accepted.image_member == "img"
    out = released_members(sample, b"PROTECTED", accepted.image_member)
    leaked = sorted(k for k, v in out.items() if v == original)
    assert not leaked, f"unprotected original released as member(s) {leaked}"


# ---------------------------------------------------------------------------------------------------- plan


def _two_shards(tmp_path) -> list[str]:
    d = tmp_path / "in"
    a = _shard(
        d / "s-000000.tar", [RawSample(f"a{i}", {"png": _img_bytes(), "cls": str(i).encode()}) for i in range(3)]
    )
    b = _shard(d / "s-000001.tar", [RawSample(f"b{i}", {"png": _img_bytes(), "cls": b"4"}) for i in range(2)])
    return [a, b]


def test_expand_inputs_brace_pattern(tmp_path):
    urls = _two_shards(tmp_path)
    assert expand_inputs([f"{tmp_path}/in/s-{{000000..000001}}.tar"]) == urls


def test_expand_inputs_directory_lists_every_tar_under_it(tmp_path):
    urls = _two_shards(tmp_path)
    nested = _shard(tmp_path / "in" / "more" / "t-000000.tar", [RawSample("c", {"png": _img_bytes(), "cls": b"0"})])
    (tmp_path / "in" / "notes.txt").write_text("not a shard")
    got = expand_inputs([str(tmp_path / "in")])
    assert sorted(got) == sorted([*urls, nested])


def test_expand_inputs_refuses_two_shards_with_the_same_stem(tmp_path):
    a = _shard(tmp_path / "x" / "train-000007.tar", [RawSample("a", {"cls": b"0"})])
    b = _shard(tmp_path / "y" / "train-000007.tar", [RawSample("b", {"cls": b"0"})])
    with pytest.raises(PlanError, match="train-000007"):
        expand_inputs([a, b])
    with pytest.raises(PlanError, match="train-000007"):
        expand_inputs([str(tmp_path)])


def test_expand_inputs_empty_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PlanError, match="no \\*.tar"):
        expand_inputs([str(tmp_path / "empty")])


def test_build_plan_counts_samples_infers_classes_and_grayscale(tmp_path):
    urls = _two_shards(tmp_path)
    plan = build_plan([f"{tmp_path}/in/s-{{000000..000001}}.tar"], None, None, "cls")
    assert [(s.id, s.url, s.samples) for s in plan.shards] == [("s-000000", urls[0], 3), ("s-000001", urls[1], 2)]
    assert plan.total_samples == 5
    assert plan.num_classes == 5  # max label 4 + 1
    assert plan.channels == 1


def test_build_plan_counts_rejectable_samples_too(tmp_path):
    url = _shard(
        tmp_path / "s.tar",
        [
            RawSample("a", {"png": _img_bytes(), "cls": b"1"}),
            RawSample("b", {"png": b"not an image", "cls": b"zzz"}),
            RawSample("c", {"txt": b"no image at all"}),
            RawSample("a", {"png": _img_bytes(), "cls": b"0"}),  # a repeat still makes a manifest row
        ],
    )
    plan = build_plan([url], None, None, "cls")
    assert plan.shards[0].samples == 4 and plan.num_classes == 2


def test_build_plan_any_rgb_image_gives_three_channels(tmp_path):
    url = _shard(
        tmp_path / "s.tar",
        [
            RawSample("g", {"png": _img_bytes("L"), "cls": b"0"}),
            RawSample("c", {"png": _img_bytes("RGB"), "cls": b"1"}),
        ],
    )
    assert build_plan([url], None, None, "cls").channels == 3


def test_build_plan_records_each_shard_and_a_rerun_reads_no_recorded_shard_again(tmp_path, monkeypatch):
    """Each shard's reading is recorded in the work dir as it is done; a rerun (after a kill) takes a recorded shard
    from its record, unless the shard changed (size, modification time) or the label settings did, and builds the
    very same plan."""
    from pipeline import plan as plan_module

    urls = _two_shards(tmp_path)
    named = _shard(tmp_path / "in" / "s-000002.tar", [RawSample("n", {"png": _img_bytes("RGB"), "cls": b"cat"})])
    records = str(tmp_path / "work" / "plan-shards")
    first = build_plan([*urls, named], None, None, "cls", record_dir=records)
    assert sorted(os.listdir(records)) == ["s-000000.json", "s-000001.json", "s-000002.json"]
    read = []
    real = plan_module.iter_samples
    monkeypatch.setattr(plan_module, "iter_samples", lambda url: read.append(url) or real(url))
    again = build_plan([*urls, named], None, None, "cls", record_dir=records)
    assert read == [] and again.digest == first.digest and again == first
    # A rewritten shard is read again (here its size is the same: tars are padded to 10 KiB), as is every shard under
    # other label settings.
    _shard(urls[1], [RawSample(f"b{i}", {"png": _img_bytes(), "cls": b"4"}) for i in range(3)])
    os.utime(urls[1], (1e9, 1e9))
    changed = build_plan([*urls, named], None, None, "cls", record_dir=records)
    assert read == [urls[1]] and changed.shards[1].samples == 3 and changed.digest != first.digest
    read.clear()
    build_plan([*urls, named], 10, None, "cls", record_dir=records)
    assert read == []  # --num-classes is applied after the records: nothing to read again
    # A damaged record is not trusted: its shard is read again.
    (tmp_path / "work" / "plan-shards" / "s-000000.json").write_text("{torn")
    assert build_plan([*urls, named], None, None, "cls", record_dir=records).digest == changed.digest
    assert read == [urls[0]]
    read.clear()
    with pytest.raises(PlanError):
        build_plan([*urls, named], None, None, "json:label", record_dir=records)
    assert read == [*urls, named]  # another label key: every shard read again (then refused: no json member)


def test_build_plan_explicit_num_classes_wins(tmp_path):
    _two_shards(tmp_path)
    assert build_plan([str(tmp_path / "in")], 10, None, "cls").num_classes == 10


def test_build_plan_without_labels_is_refused_even_with_num_classes(tmp_path):
    """--num-classes cannot label a sample: every one would be rejected after loading, so the plan refuses."""
    url = _shard(tmp_path / "s.tar", [RawSample(f"k{i}", {"png": _img_bytes()}) for i in range(3)])
    for num_classes in (None, 3):
        with pytest.raises(PlanError, match="no sample has a usable label under --label-key cls"):
            build_plan([url], num_classes, None, "cls")


def test_build_plan_missing_shard_is_refused(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        build_plan([str(tmp_path / "missing.tar")], 2, None, "cls")


def test_plan_parquet_round_trip_and_digest_is_stable(tmp_path):
    _two_shards(tmp_path)
    plan = build_plan([str(tmp_path / "in")], None, None, "cls")
    again = Plan.from_parquet(plan.to_parquet())
    assert again == plan
    assert again.digest == plan.digest == build_plan([str(tmp_path / "in")], None, None, "cls").digest
    assert len(plan.digest) == 16
    changed = Plan(
        (plan.shards[0], ShardPlan(plan.shards[1].id, plan.shards[1].url, 99)), plan.num_classes, plan.channels
    )
    assert changed.digest != plan.digest
    assert Plan(plan.shards, plan.num_classes, 3).digest != plan.digest


# ---------------------------------------------------------------------------------------------------- config


def test_resolved_fills_step_size_and_pgd_steps_by_mode():
    sw = _cfg().resolved()
    assert sw.step_size == pytest.approx(sw.eps / 10) and sw.pgd_steps == 20
    cw = _cfg(mode="classwise").resolved()
    assert cw.pgd_steps == 1 and cw.step_size == pytest.approx(8 / 255 / 10)
    assert _cfg(pgd_steps=5).resolved().pgd_steps == 5


def test_resolved_parses_fractions():
    cfg = _cfg(eps="8/255", step_size="1/255").resolved()
    assert cfg.eps == pytest.approx(8 / 255) and isinstance(cfg.eps, float)
    assert cfg.step_size == pytest.approx(1 / 255)
    assert _cfg(eps="16/255").resolved().step_size == pytest.approx(16 / 255 / 10)


@pytest.mark.parametrize(
    "kw, named",
    [
        ({"mode": "pixelwise"}, "--mode"),
        ({"surrogate": "no-such-net"}, "no-such-net"),
        ({"probe_arch": "no-such-probe"}, "no-such-probe"),
        ({"pgd_steps": -1}, "--pgd-steps"),
        ({"train_steps": -1}, "--train-steps"),
        ({"batch_size": 0}, "--batch-size"),
        ({"max_rounds": 0}, "--max-rounds"),
        ({"eps": 0}, "--eps"),
        ({"eps": "2"}, "--eps"),
        ({"stop_error": 1.5}, "--stop-error"),
        ({"probe_threshold": -0.1}, "--probe-threshold"),
        ({"inputs": []}, "--input"),
    ],
)
def test_resolved_rejects_bad_values_naming_the_field(kw, named):
    with pytest.raises(ValueError, match=named.replace("-", "\\-")):
        _cfg(**kw).resolved()


def test_resolved_rejects_a_non_positive_step_size():
    for step_size in (-0.01, "-1/255", 0.0):
        with pytest.raises(ValueError, match="step"):
            _cfg(step_size=step_size).resolved()


def test_config_hash_changes_with_hashed_fields():
    base = config_hash(_cfg().resolved(), "plan1")
    assert config_hash(_cfg(eps="4/255").resolved(), "plan1") != base
    assert config_hash(_cfg(seed=1).resolved(), "plan1") != base
    assert config_hash(_cfg(mode="classwise").resolved(), "plan1") != base
    assert config_hash(_cfg(surrogate="mlp").resolved(), "plan1") != base
    assert config_hash(_cfg().resolved(), "plan2") != base
    assert config_hash(_cfg().resolved(), "plan1") == base


def test_config_hash_ignores_workers_addresses_and_max_rounds():
    base = config_hash(_cfg().resolved(), "p")
    for kw in (
        {"workers": 8},
        {"ray_address": "ray://head:10001"},
        {"max_rounds": 99},
        {"gpus_per_worker": 1},
        {"cpus_per_worker": 2},
        {"work_dir": "/elsewhere"},
        {"keep_work": True},
        {"overwrite": True},
        {"output": "/other-out"},
        {"inputs": ["/other/in.tar"]},
        {"cache": "none"},
        {"cache": "memory"},
        {"cache": "disk"},
        {"cache_memory_gb": 0.5},
    ):
        assert config_hash(_cfg(**kw).resolved(), "p") == base, kw
    assert not {"workers", "ray_address", "max_rounds"} & set(HASH_FIELDS)


def test_fields_added_later_change_the_hash_only_when_set_away_from_what_earlier_runs_did():
    """--robust, --keep-metadata and --encode-format came after the first runs: at off / False / png a run keeps the
    identity it had before they existed (it resumes under the newer version); set, they change it and are named as
    the difference."""
    cfg = _cfg().resolved()
    before = cfg.hashed_fields()
    assert not {"robust", "keep_metadata", "encode_format", "encode_quality"} & set(before)
    base = config_hash(cfg, "p")
    for kw in ({"robust": "on"}, {"keep_metadata": True}, {"encode_format": "webp", "encode_quality": 90}):
        changed = _cfg(**kw).resolved()
        assert config_hash(changed, "p") != base, kw
        assert differing_fields(before, changed.hashed_fields()) == sorted(kw), kw
    # A JPEG's quality is part of its identity, its default included.
    jpegs = [config_hash(_cfg(encode_format="jpeg", encode_quality=q).resolved(), "p") for q in (None, 90, 85)]
    assert jpegs[0] == jpegs[1] != jpegs[2] and base not in jpegs


def test_cache_mode_and_budget_are_validated():
    for kw, match in (({"cache": "tape"}, "--cache must be"), ({"cache_memory_gb": -1}, "--cache-memory-gb")):
        with pytest.raises(ValueError, match=match):
            _cfg(**kw).resolved()


def test_encode_format_and_quality_are_validated():
    assert _cfg(encode_format="JPEG").resolved().encode_format == "jpeg"
    assert _cfg().resolved().encode_quality is None
    for kw, match in (
        ({"encode_format": "gif"}, "--encode-format"),
        ({"encode_quality": 80}, "PNG is lossless"),
        ({"encode_format": "jpeg", "encode_quality": 0}, "--encode-quality"),
        ({"encode_format": "webp", "encode_quality": 101}, "--encode-quality"),
    ):
        with pytest.raises(ValueError, match=match):
            _cfg(**kw).resolved()


def test_config_hash_same_for_fraction_text_and_float():
    assert config_hash(_cfg(eps="8/255").resolved(), "p") == config_hash(_cfg(eps=8 / 255).resolved(), "p")


def test_differing_fields_names_the_changed_fields():
    a = _cfg().resolved().hashed_fields()
    b = _cfg(eps="4/255", seed=3).resolved().hashed_fields()
    assert differing_fields(a, b) == ["eps", "seed", "step_size"]
    assert differing_fields(a, dict(a)) == []
    assert differing_fields({"x": 1}, {"y": 1}) == ["x", "y"]


# ---------------------------------------------------------------------------------------------------- mnist


@pytest.fixture(scope="module")
def mnist_arrays():
    x, y = mnist.load_mnist()  # the real bundled data, loaded once (~2 s)
    return x, y


@pytest.fixture
def cached_mnist(mnist_arrays, monkeypatch):
    monkeypatch.setattr(mnist, "load_mnist", lambda: mnist_arrays)
    return mnist_arrays


def test_load_mnist_is_5000_grayscale_digits(mnist_arrays):
    x, y = mnist_arrays
    assert x.shape == (5000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (5000,) and set(np.unique(y)) == set(range(10))


def test_mnist_split_is_stratified_disjoint_and_deterministic(cached_mnist):
    _, y = cached_mnist
    train, test = mnist.split(7, 3, seed=0)
    assert np.bincount(y[train], minlength=10).tolist() == [7] * 10
    assert np.bincount(y[test], minlength=10).tolist() == [3] * 10
    assert not set(train.tolist()) & set(test.tolist())
    assert len(set(train.tolist())) == 70 and len(set(test.tolist())) == 30
    again = mnist.split(7, 3, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    other = mnist.split(7, 3, seed=1)
    assert not np.array_equal(other[0], train)


def test_mnist_split_refuses_more_than_a_class_holds(cached_mnist):
    with pytest.raises(ValueError, match="only"):
        mnist.split(400, 101)


def test_mnist_write_shards_gives_28x28_grayscale_pngs_and_integer_cls(cached_mnist, tmp_path):
    x, y = cached_mnist
    indices = np.array([3, 14, 159, 2653, 4999])
    urls = mnist.write_shards(str(tmp_path / "train"), indices, "train", per_shard=2)
    assert [os.path.basename(u) for u in urls] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    got = [s for u in urls for s in iter_samples(u)]
    assert not any(isinstance(s, ShardReadError) for s in got)
    assert [s.key for s in got] == [f"mnist-{i:05d}" for i in indices]
    for s, i in zip(got, indices):
        assert sorted(s.members) == ["cls", "png"]
        with Image.open(io.BytesIO(s.members["png"])) as img:
            assert img.format == "PNG" and img.mode == "L" and img.size == (28, 28)
            assert np.array_equal(np.asarray(img), x[i])
        assert int(s.members["cls"]) == int(y[i])
    # and the protect pipeline's own rules accept them
    seen: set[str] = set()
    assert all(isinstance(prepare(s, _rules(), seen), Accepted) for s in got)


def test_a_label_too_large_for_any_model_is_rejected_without_num_classes():
    from pipeline.samples import parse_label

    with pytest.raises(ValueError, match="out of range"):
        parse_label({"cls": b"1000000000000"}, "cls", None)
    assert parse_label({"cls": b"999999\n"}, "cls", None) == 999999


# ---------------------------------------------------------------------------------------------------- hostile samples


@pytest.mark.parametrize("fmt,ext", [("TIFF", "tif"), ("BMP", "bmp"), ("GIF", "gif"), ("PNG", "jpg"), ("PNG", "bin")])
def test_a_second_image_member_rejects_the_sample_instead_of_releasing_it_unprotected(fmt, ext):
    """A ``.png`` with a copy of the image under any other member: the copy would be released as it is."""
    copy = _img_bytes("RGB", (6, 5), fmt=fmt)
    result = prepare(RawSample("k", {"png": _img_bytes("RGB"), ext: copy, "cls": b"2"}), _rules(), set())
    assert isinstance(result, Rejected)
    assert f"second member '.{ext}' decodes as an image" in result.error and "unprotected" in result.error


def test_text_members_beside_the_image_are_not_taken_for_images():
    members = {"png": _img_bytes(), "cls": b"2", "txt": b"a caption", "json": b'{"label": 2}'}
    assert isinstance(prepare(RawSample("k", members), _rules(), set()), Accepted)


@pytest.mark.parametrize("key", ["../../evil", "/abs/evil2", "a/../../b", "..", "\\\\server\\share"])
def test_keys_that_escape_the_folder_of_whoever_unpacks_the_release_are_rejected(key):
    result = prepare(RawSample(key, {"png": _img_bytes(), "cls": b"2"}), _rules(), set())
    assert isinstance(result, Rejected) and "absolute or holds '..'" in result.error


def test_a_member_name_that_is_not_utf8_is_rejected_with_a_printable_key(tmp_path):
    """tarfile hands a non-UTF-8 name over with surrogate escapes, which no manifest can hold: one row, rejected."""
    members = [(b"bad\xff.png", _img_bytes()), (b"bad\xff.cls", b"2"), (b"good.png", _img_bytes()), (b"good.cls", b"2")]
    data = raw_tar([(name.decode("utf-8", "surrogateescape"), data) for name, data in members])
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    results = [r for _, r in prepare_each(iter_samples(str(path)), _rules(), 1)]
    assert [type(r).__name__ for r in results] == ["Rejected", "Accepted"]
    assert results[0].key == "bad\\xff" and "not valid UTF-8" in results[0].error
    results[0].key.encode("utf-8")  # the manifest can hold it


def test_protect_takes_every_default_from_the_config_dataclass():
    """One set of defaults: ``protect`` with only its required arguments gives ``ProtectConfig``'s own defaults (eps
    is written as the fraction 8/255 on the command line)."""
    from dataclasses import MISSING, fields

    from pipeline.cli import build_parser, config_from_args

    parsed = config_from_args(build_parser().parse_args(["protect", "--input", "in", "--output", "out"]))
    for f in fields(ProtectConfig):
        if f.default is not MISSING and f.name != "eps":
            assert getattr(parsed, f.name) == f.default, f.name
    assert parsed.resolved().eps == ProtectConfig(inputs=["in"], output="out").resolved().eps
