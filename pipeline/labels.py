"""Where a sample's class comes from, and how class names become the integer ids the surrogate trains on.

``--label-key`` names a member (``cls`` by default, ``txt``, any extension) whose text is the label, or a field of a
JSON member (``json:label``, ``json:meta.class``: a dotted path). A label is an integer (plain ASCII digits) or a
class name (any other short, single-line text). The plan reads every label of the corpus once (``LabelCensus``) and
decides how labels become ids:

- every label is an integer: the ids are the integers (``--num-classes`` defaults to the largest plus one);
- otherwise every label, digits included, is a class name, and the id of a name is its position in the sorted
  list of all names (the *vocabulary*), which the plan records and the workers use;
- ``--num-classes K`` says that the labels are integer ids in [0, K): names are then rejected, never mapped.

A label that is neither (missing, empty, not UTF-8, a JSON object, list, null, bool or fraction, a caption over
several lines) rejects its sample with the reason in its manifest row.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import unicodedata
from dataclasses import dataclass

log = logging.getLogger(__name__)

PLAIN_LABEL = re.compile(rb"[0-9]{1,40}\n?")
PLAIN_DIGITS = re.compile(r"[0-9]{1,40}")
# Labels index the surrogate's output layer: a label of 10**12 would ask for a model no machine holds.
MAX_LABEL = 1_000_000
# A class name is a short label, not a caption or a document.
MAX_NAME_CHARS = 256
# How many samples' members and JSON fields the plan quotes when no sample has a usable label.
SAMPLES_QUOTED = 20


class LabelsRefused(ValueError):
    """No label of the corpus can be used as asked (the plan turns it into its PlanError)."""


@dataclass(frozen=True)
class LabelSource:
    """A parsed ``--label-key``: the member that holds the label and, for a JSON member, the path to the field."""

    member: str
    path: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> LabelSource:
        """``cls``, ``txt``, any member extension, or ``MEMBER:FIELD[.FIELD...]`` (``json:label``, ``json:meta.class``)
        for a field of a JSON member; ValueError says what is wrong."""
        member, sep, field = spec.partition(":")
        if not member or member.startswith(".") or "/" in member:
            raise ValueError(f"--label-key {spec!r}: name a member by its extension (cls, txt, json:FIELD)")
        if not sep:
            return cls(member)
        path = tuple(field.split("."))
        if not field or any(not part for part in path):
            raise ValueError(f"--label-key {spec!r}: name the JSON field after the colon (json:label, json:meta.class)")
        return cls(member, path)

    def __str__(self) -> str:
        return self.member + (":" + ".".join(self.path) if self.path else "")

    @property
    def where(self) -> str:
        """How a manifest error names the label: ``'.cls'`` or ``field 'meta.class' of '.json'``."""
        return f"field '{'.'.join(self.path)}' of '.{self.member}'" if self.path else f"'.{self.member}'"


def read_label(members: dict[str, bytes], source: LabelSource) -> str:
    """The sample's label as text: an integer's digits, or a name as written (one trailing newline dropped, as
    ``echo cat > k.txt`` writes it). ValueError (the manifest's error) when there is no label to read."""
    if source.member not in members:
        what = "label member" if not source.path else "JSON member"
        raise ValueError(f"no {what} '.{source.member}'")
    raw = members[source.member]
    if not source.path:
        if PLAIN_LABEL.fullmatch(raw):
            return raw.rstrip(b"\n").decode("ascii")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"label '.{source.member}' is not valid UTF-8: {raw[:40]!r}") from None
        return text.removesuffix("\n")
    return _json_label(raw, source)


def _json_label(raw: bytes, source: LabelSource) -> str:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"'.{source.member}' is not valid JSON, so it holds no label") from None
    for depth, part in enumerate(source.path):
        if not isinstance(value, dict) or part not in value:
            missing = ".".join(source.path[: depth + 1])
            raise ValueError(f"no field '{missing}' in '.{source.member}'")
        value = value[part]
    # bool is an int in Python: true/false are not classes anyone meant.
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"label {source.where} is {value}, a negative integer")
        return str(value)
    if isinstance(value, str):
        return value
    kind = {
        dict: "a JSON object",
        list: "a JSON list",
        float: f"the fraction {value!r}",
        bool: json.dumps(value),
        type(None): "null",
    }.get(type(value), type(value).__name__)
    raise ValueError(f"label {source.where} is {kind}, not an integer or a class name")


def is_integer_label(text: str) -> bool:
    """Plain ASCII digits only: int() would also take " 2 ", "+2", "0_3" and non-ASCII digits such as "３", so two
    spellings could name one class unnoticed."""
    return PLAIN_DIGITS.fullmatch(text) is not None


def check_name(text: str, source: LabelSource) -> str:
    """``text`` when it can be a class name; ValueError says why not. Names are compared exactly, so a label that
    differs from another only by spaces or line breaks would split a class unnoticed: such labels are refused."""
    if not text:
        raise ValueError(f"label {source.where} is empty")
    if len(text) > MAX_NAME_CHARS:
        raise ValueError(
            f"label {source.where} is {len(text)} characters long, more than a class name "
            f"({MAX_NAME_CHARS}): {text[:40]!r}"
        )
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in text):
        raise ValueError(
            f"label {source.where} holds a line break or control character (a caption, not a class name): {text[:40]!r}"
        )
    if text != text.strip():
        raise ValueError(f"label {source.where} has spaces around it: {text[:40]!r}")
    return text


def label_id(
    members: dict[str, bytes], source: LabelSource, num_classes: int | None, ids: dict[str, int] | None
) -> int:
    """The sample's class id: the integer itself, or (``ids`` given: the plan's vocabulary) the position of its
    name. ValueError (the manifest's error) says what is wrong."""
    text = read_label(members, source)
    if ids is not None:
        check_name(text, source)
        if text not in ids:
            raise ValueError(
                f"label {source.where} {text[:40]!r} is not in the plan's class vocabulary "
                "(the shard changed after the plan was made)"
            )
        return ids[text]
    if not is_integer_label(text):
        raise ValueError(f"label {source.where} is not an integer (plain ASCII digits): {text[:40]!r}")
    label = int(text)
    if label >= MAX_LABEL or (num_classes is not None and label >= num_classes):
        raise ValueError(f"label {label} out of range [0, {num_classes or MAX_LABEL})")
    return label


def parse_label(
    members: dict[str, bytes], label_key: str, num_classes: int | None, ids: dict[str, int] | None = None
) -> int:
    """``label_id`` with ``--label-key`` as text."""
    return label_id(members, LabelSource.parse(label_key), num_classes, ids)


class LabelCensus:
    """Every label of the corpus, read once at plan time: it decides integers or names, builds the vocabulary and
    refuses, before any worker starts, a corpus whose labels cannot be used."""

    def __init__(self, source: LabelSource):
        self.source = source
        self.labels: collections.Counter[str] = collections.Counter()  # usable label texts and their samples
        self.unusable = 0
        self.first_problem: str | None = None
        self.members_seen: set[str] = set()
        self.json_fields: dict[str, set[str]] = {}
        self.samples = 0

    def add(self, members: dict[str, bytes]) -> None:
        if self.samples < SAMPLES_QUOTED:
            self._remember_shape(members)
        self.samples += 1
        try:
            text = read_label(members, self.source)
            if not is_integer_label(text):
                check_name(text, self.source)
        except ValueError as exc:
            self.unusable += 1
            self.first_problem = self.first_problem or str(exc)
            return
        self.labels[text] += 1

    def to_record(self) -> dict:
        """What this census holds, as JSON (a shard's part of the plan, recorded in the work dir)."""
        return {
            "labels": dict(self.labels),
            "unusable": self.unusable,
            "first_problem": self.first_problem,
            "members_seen": sorted(self.members_seen),
            "json_fields": {k: sorted(v) for k, v in self.json_fields.items()},
            "samples": self.samples,
        }

    def merge(self, record: dict) -> None:
        """Add another census' ``to_record`` (a shard's): the same as having read its samples here, except that the
        members and JSON fields an error message quotes come from the first shards only."""
        if self.samples < SAMPLES_QUOTED:
            self.members_seen.update(record["members_seen"])
            for ext, names in record["json_fields"].items():
                self.json_fields.setdefault(ext, set()).update(names)
        self.samples += record["samples"]
        self.labels.update(record["labels"])
        self.unusable += record["unusable"]
        self.first_problem = self.first_problem or record["first_problem"]

    def _remember_shape(self, members: dict[str, bytes]) -> None:
        self.members_seen.update(members)
        for ext, data in members.items():
            if not ext.endswith("json"):
                continue
            try:
                value = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(value, dict):
                self.json_fields.setdefault(ext, set()).update(str(k) for k in value)

    def classes(self, num_classes: int | None) -> tuple[int, tuple[str, ...]]:
        """(number of classes, vocabulary): an empty vocabulary means integer labels. LabelsRefused when the corpus
        cannot be protected with these labels (its text says what to pass)."""
        integers = [int(t) for t in self.labels if is_integer_label(t) and int(t) < MAX_LABEL]
        names = [t for t in self.labels if not is_integer_label(t)]
        if not self.labels:
            raise LabelsRefused(self._no_label_message())
        if num_classes is not None:
            if not integers:
                example = names[0] if names else max(self.labels)
                raise LabelsRefused(
                    f"--num-classes takes integer labels, and no label under --label-key {self.source} is an integer "
                    f"below {MAX_LABEL} (e.g. {example[:40]!r}); drop --num-classes: class names set the classes"
                )
            if max(integers) >= num_classes:
                raise LabelsRefused(
                    f"--num-classes {num_classes} is too small: the largest label under --label-key {self.source} is "
                    f"{max(integers)}; pass --num-classes {max(integers) + 1} or more, or leave it out (default: "
                    "the largest label + 1)"
                )
            if names:
                log.warning(
                    "plan: %d samples have class names (e.g. %r) under --label-key %s; with --num-classes "
                    "labels are integers, so they are rejected",
                    sum(self.labels[t] for t in names),
                    names[0][:40],
                    self.source,
                )
            return num_classes, ()
        if not names:
            if not integers:
                raise LabelsRefused(
                    f"every label under --label-key {self.source} is out of range [0, {MAX_LABEL}): "
                    "number the classes from 0"
                )
            return max(integers) + 1, ()
        vocabulary = tuple(sorted(self.labels))
        if len(vocabulary) > MAX_LABEL:
            raise LabelsRefused(
                f"the labels under --label-key {self.source} name {len(vocabulary)} classes, more than "
                f"{MAX_LABEL}: pass --label-key with the member or JSON field that holds the class"
            )
        if len(names) < len(vocabulary):
            log.warning(
                "plan: labels under --label-key %s mix integers and class names (e.g. %r): every label, "
                "digits included, is read as a class name",
                self.source,
                names[0][:40],
            )
        labelled = sum(self.labels.values())
        if labelled >= 20 and len(vocabulary) > labelled // 2:
            log.warning(
                "plan: %d samples have %d distinct labels under --label-key %s (e.g. %r): captions or ids "
                "rather than classes?",
                labelled,
                len(vocabulary),
                self.source,
                vocabulary[0][:40],
            )
        return len(vocabulary), vocabulary

    def _no_label_message(self) -> str:
        if not self.samples:
            return (
                "no sample of the corpus can be protected: the shards are empty, or no sample has a readable "
                "image member (png|jpg|jpeg|webp, or --image-key), safe names and no second image"
            )
        members = ", ".join(sorted(self.members_seen)) or "none"
        hints = []
        for ext, fields in sorted(self.json_fields.items()):
            listed = ", ".join(sorted(fields)[:8]) + (", ..." if len(fields) > 8 else "")
            hints.append(f"--label-key {ext}:FIELD (fields seen: {listed})")
        text_members = sorted(
            m
            for m in self.members_seen
            if m not in self.json_fields and not _looks_like_image(m) and m != self.source.member
        )
        hints += [f"--label-key {m}" for m in text_members]
        advice = (
            "pass " + " or ".join(hints) if hints else "add a label member to each sample"
        ) + " (a member or JSON field holding each sample's class: an integer or a class name)"
        problem = f" ({self.first_problem})" if self.first_problem else ""
        return (
            f"no sample has a usable label under --label-key {self.source}{problem}; "
            f"samples have members {members}: {advice}"
        )


def _looks_like_image(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1].lower() in ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff")
