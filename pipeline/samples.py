"""From a raw shard sample to a protectable one or a rejection with a clear reason.

Both the worker's load (rounds) and the export apply exactly these rules, so a sample is rejected or protected
the same way everywhere and ends in exactly one manifest row.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from pipeline.labels import LabelSource, label_id, parse_label  # noqa: F401 - parse_label: the rules' old home
from pipeline.storage.shards import RawSample, ShardReadError

if TYPE_CHECKING:  # ops.image imports torch: decode_sample imports it when it first decodes (status, verify and the
    # plan's screening use this module without torch)
    from ops.image import DecodedImage

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# The manifest error of a repeated key; ``verify`` recognises these rows by it.
REPEATED_KEY_ERROR = "key repeated in shard (the first occurrence is kept)"


@dataclass
class SampleRules:
    num_classes: int | None
    max_pixels: int
    image_key: str | None = None
    label_key: str = "cls"
    # The plan's class vocabulary: a label's id is the position of its name. None: labels are integers.
    label_names: list[str] | tuple[str, ...] | None = None
    # Decode the ICC profile, EXIF and XMP too (the export writes them; the rounds need pixels only).
    metadata: bool = False
    # The release's encoding (--encode-format): an image it cannot hold (alpha in a JPEG) is rejected at the load.
    encode_format: str = "png"
    # --labels cluster: no label is read; the worker gives each sample its cluster (pipeline.clusters).
    cluster: bool = False

    def __post_init__(self) -> None:
        self.label_source = LabelSource.parse(self.label_key)
        self.label_ids = {name: i for i, name in enumerate(self.label_names)} if self.label_names else None

    def label(self, members: dict[str, bytes]) -> int:
        """The sample's class id (``pipeline.labels``); ValueError says what is wrong. -1 with ``cluster``: the
        worker assigns it."""
        if self.cluster:
            return -1
        return label_id(members, self.label_source, self.num_classes, self.label_ids)


@dataclass
class Accepted:
    key: str
    label: int
    image_member: str
    image: DecodedImage
    source_sha256: str


@dataclass
class Rejected:
    key: str
    error: str
    label: int | None = None
    source_sha256: str | None = None


def find_image_member(members: dict[str, bytes], image_key: str | None) -> str | None:
    if image_key is not None:
        return image_key if image_key in members else None
    for ext in IMAGE_EXTENSIONS:
        if ext in members:
            return ext
    return None


def second_image_member(members: dict[str, bytes], image_member: str) -> str | None:
    """The first member other than ``image_member`` that is an image: by its extension, or because Pillow
    recognises its bytes (a ``.tif``, ``.bmp``, ``.gif`` or an image under any other name)."""
    for ext, data in sorted(members.items()):
        if ext == image_member:
            continue
        if is_image_member(ext) or _decodes_as_image(data):
            return ext
    return None


def _decodes_as_image(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)):  # the header only: no pixels are decoded
            return True
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for "not an image"
        return False


def is_image_member(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def prepare(sample: RawSample, rules: SampleRules, seen_keys: set[str]) -> Accepted | Rejected:
    """Validate and decode one sample; ``seen_keys`` (the shard's keys so far) rejects a repeated key."""
    return screen(sample, seen_keys) or decode_sample(sample, rules)


def printable_key(key: str) -> str:
    """The key as the manifest can hold it: a tar name that is not valid UTF-8 keeps its bytes as ``\\xNN`` escapes
    (tarfile hands such names over with surrogate escapes, which Parquet, JSON and most readers refuse)."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unsafe_name(sample: RawSample) -> str | None:
    """Why the sample's key or a member name must not be released, or None: a name that is absolute or holds
    ``..`` would write outside the folder of anyone who unpacks the release; one that is not valid UTF-8 is not a
    name the manifest, the release's readers or other tools can hold."""
    names = [sample.key] + [f"{sample.key}.{ext}" for ext in sample.members]
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            return "key or member name is not valid UTF-8"
        if name.startswith(("/", "\\")) or ".." in name or "\0" in name:
            return "key or member name is absolute or holds '..'"
    return None


def screen(sample: RawSample, seen_keys: set[str]) -> Rejected | None:
    """The part of ``prepare`` that depends on the samples before this one (runs in shard order)."""
    unsafe = unsafe_name(sample)
    if unsafe:
        return Rejected(printable_key(sample.key), unsafe)
    if sample.truncated:
        return Rejected(sample.key, "sample cut off: the shard is truncated inside it")
    if sample.key in seen_keys:
        return Rejected(sample.key, REPEATED_KEY_ERROR)
    seen_keys.add(sample.key)
    return None


def decode_sample(sample: RawSample, rules: SampleRules) -> Accepted | Rejected:
    """The part of ``prepare`` that depends on this sample alone (any thread may run it)."""
    from ops.image import ImageRejected, decode_image, unencodable

    member = find_image_member(sample.members, rules.image_key)
    if member is None:
        wanted = f"'.{rules.image_key}'" if rules.image_key else "png|jpg|jpeg|webp"
        return Rejected(sample.key, f"no image member ({wanted}); members: {sorted(sample.members)}")
    data = sample.members[member]
    sha = hashlib.sha256(data).hexdigest()
    copy = second_image_member(sample.members, member)
    if copy is not None:
        # Only one image per sample is protected: another copy of the content would be released unprotected.
        return Rejected(
            sample.key,
            f"a second member '.{copy}' decodes as an image and would be released "
            f"unprotected (only '.{member}' is protected)",
            source_sha256=sha,
        )
    try:
        label = rules.label(sample.members)
    except ValueError as exc:
        return Rejected(sample.key, str(exc), source_sha256=sha)
    try:
        image = decode_image(data, rules.max_pixels, metadata=rules.metadata)
    except ImageRejected as exc:
        return Rejected(sample.key, str(exc), label=None if rules.cluster else label, source_sha256=sha)
    problem = unencodable(rules.encode_format, image.width, image.height, image.alpha is not None)
    if problem:
        return Rejected(sample.key, problem, label=None if rules.cluster else label, source_sha256=sha)
    return Accepted(sample.key, label, member, image, sha)


def prepare_each(
    items: Iterable[RawSample | ShardReadError], rules: SampleRules, threads: int
) -> Iterator[tuple[RawSample | ShardReadError, Accepted | Rejected | ShardReadError]]:
    """``prepare`` over a shard's items as (item, outcome) pairs, in shard order (so the outcome is the sequential
    one), with the decoding (Pillow, hashing) on ``threads`` threads. A read error is its own outcome."""

    def work(job: tuple) -> tuple:
        item, early = job
        return item, early if early is not None else decode_sample(item, rules)

    seen: set[str] = set()
    jobs = ((item, item if isinstance(item, ShardReadError) else screen(item, seen)) for item in items)
    return ordered_map(work, jobs, threads)


def reread(
    shard: str, items: Iterable[RawSample | ShardReadError], keys: list[str], rules: SampleRules, threads: int
) -> Iterator[tuple[RawSample | ShardReadError, Accepted | Rejected | ShardReadError, int | None]]:
    """A loaded shard read again (the stop check, the export): ``prepare_each``'s (item, outcome) pairs with each
    accepted sample's index among ``keys``, the keys accepted when the shard was loaded (None for the others). Raises
    RuntimeError when the shard changed since: an accepted key out of place, or too few of them at the end."""
    index = 0
    for item, result in prepare_each(items, rules, threads):
        if isinstance(result, (ShardReadError, Rejected)):
            yield item, result, None
            continue
        if index >= len(keys) or keys[index] != result.key:
            raise RuntimeError(f"shard {shard} changed since it was loaded (sample {result.key})")
        index += 1
        yield item, result, index - 1
    if index != len(keys):
        raise RuntimeError(f"shard {shard} changed since it was loaded: {index} of {len(keys)} samples found")


def ordered_map(fn: Callable, items: Iterable, threads: int, chunk: int = 16, depth: int = 4) -> Iterator:
    """``map(fn, items)`` on ``threads`` threads, results in input order. Items go to the threads ``chunk`` at a time
    (tiny images cost less than a task hand-off), with at most ``depth`` x ``threads`` chunks in flight. Pillow's
    decode and encode, hashlib and torch's copies release the GIL, so threads give real parallelism on photos. Keep
    torch's heavy work (resizes, the noise) on the calling thread: started from every thread, its intra-op threads
    would oversubscribe the cores. (The channel-first copies in decode and encode stay torch: as numpy copies, which
    hold the GIL, a 2-thread export of 256-px photos ran 1.4x slower here.)"""
    if threads <= 1:
        yield from map(fn, items)
        return
    it = iter(items)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="samples") as pool:
        pending: collections.deque[Future] = collections.deque()
        while True:
            part = list(itertools.islice(it, chunk))
            if part:
                pending.append(pool.submit(lambda xs: [fn(x) for x in xs], part))
            if pending and (not part or len(pending) >= depth * threads):
                yield from pending.popleft().result()
            elif not part:
                return


def released_members(sample: RawSample, encoded: bytes, image_member: str, ext: str = "png") -> dict[str, bytes]:
    """The protected sample's members: ``ext`` (png, jpg or webp) holds the protected image; every non-image member
    is unchanged.

    The original image member and any other image member are dropped: they are unprotected copies of the content.
    """
    out = {name: data for name, data in sample.members.items() if not is_image_member(name) and name != image_member}
    out[ext] = encoded
    return out
