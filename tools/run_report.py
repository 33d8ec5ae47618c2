"""``unlearnable report OUTPUT``: ``report.html`` and its PNG figures for a finished run, in a folder beside the release.

It reads the release only (``_SUCCESS.json``, ``manifest.parquet`` and the shards of the few samples it shows) and,
with ``--input``, the originals of those samples; it writes only into the report folder, which is never inside the
release (OUTPUT holds nothing but the release) nor inside the work dir. The page is self-contained: relative image
links to PNGs in its own folder, an inline style sheet, no script, nothing fetched from a network. Every string that
a user's files or flags can put into it (keys, labels, rejection reasons, config values, locations) is escaped.
"""

from __future__ import annotations

import collections
import html
import io
import json
import logging
import os
import re
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image

from ops.image import ImageRejected, decode_image, to_gray
from pipeline.samples import find_image_member
from pipeline.storage import fs
from pipeline.storage.layout import Layout, default_work_dir
from pipeline.storage.shards import RawSample, iter_samples, shard_id, split_member_name

log = logging.getLogger(__name__)

REPORT_SUFFIX = ".report"  # the default report folder: <release>.report, beside the release
HTML_NAME = "report.html"
DEFAULT_SAMPLES = 8
THUMB_PX = 144  # the longest side of a sample's picture on the page
# The files a report writes besides report.html; a rerun removes the old ones of these names (and no others).
OWN_FILES = re.compile(r"(rounds|battery|sample-\d{2}-(original|noise|released))\.png")
MANIFEST_COLUMNS = ("key", "shard", "status", "error", "label", "output_member", "linf")


@dataclass
class Shown:
    """One sample on the page: its released pixels and, when ``--input`` found it, its original's."""

    key: str
    shard: str
    label: int | None
    released: np.ndarray  # uint8, H x W (grayscale) or H x W x 3
    original: np.ndarray | None = None
    note: str | None = None  # why there is no original or no noise picture

    @property
    def noise(self) -> np.ndarray | None:
        """released - original in uint8 levels, when both are the same shape. (A gray original released as RGB with
        equal channels, as WebP releases gray images, is compared as gray.)"""
        if self.original is None:
            return None
        released = self.released
        if self.original.ndim == 2 and released.ndim == 3:
            # As the manifest measured it (ops.image.match_channels): a lossy codec leaves the channels a level apart.
            released = to_gray(torch.from_numpy(released).permute(2, 0, 1))[0].numpy()
        if self.original.shape != released.shape:
            return None
        return released.astype(np.int16) - self.original.astype(np.int16)


def report_dir(output: str, out: str | None = None) -> str:
    """The local folder the report goes into: ``out``, or ``<release>.report`` beside a local release, or
    ``./<last component>.report`` for a release at a URL. ValueError for a folder inside the release or its work
    dir (the release holds nothing but the release; the work dir is deleted or holds the noise)."""
    output = fs.strip_url(output)
    if out is None:
        if fs.location(output)[0] == "file":
            out = fs.location(output)[1] + REPORT_SUFFIX
        else:
            out = os.path.join(os.getcwd(), output.rsplit("/", 1)[-1] + REPORT_SUFFIX)
    elif "://" in out and not out.startswith("file://"):
        raise ValueError(f"--out {out} is not a local folder: the report is written locally (copy it where you like)")
    where = fs.location(out)
    places = [("the release", output)]
    try:
        places.append(("the run's work dir", default_work_dir(output)))
    except ValueError:
        pass  # a release at a bucket root has no default work dir
    for what, place in places:
        if fs.within(where, fs.location(place)):
            raise ValueError(
                f"--out {out} is inside {what} ({place}): the report goes beside the release, never "
                f"into it (default: {output}{REPORT_SUFFIX})"
            )
    return where[1]


def read_success(output: str) -> dict:
    """The run record; ValueError (one line) when the run has not finished."""
    output = fs.strip_url(output)
    try:
        data = fs.read_bytes(Layout(output, "").success)
    except FileNotFoundError:
        raise ValueError(
            f"{output}: the run is not finished (no _SUCCESS.json); `unlearnable status {output}` says where it stands"
        ) from None
    try:
        success = json.loads(data)
    except ValueError:
        raise ValueError(
            f"{output}/_SUCCESS.json is not valid JSON: the release is damaged (`unlearnable verify {output}`)"
        ) from None
    if not isinstance(success, dict) or not isinstance(success.get("protection"), dict):
        # ValueError, not TypeError: the CLI turns it into one line and exit 2, like every bad input.
        raise ValueError(f"{output}/_SUCCESS.json is not a run record: `unlearnable verify {output}`")  # noqa: TRY004
    return success


def read_manifest(output: str):
    """The merged manifest's columns the report needs (a pyarrow Table), or None when it is missing or damaged."""
    url = Layout(fs.strip_url(output), "").manifest
    try:
        data = fs.read_bytes(url)
    except FileNotFoundError:
        return None
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        # Only the columns the report needs are decoded (a million-row manifest's hashes stay on disk).
        return parquet.read(columns=[c for c in MANIFEST_COLUMNS if c in parquet.schema_arrow.names])
    except Exception:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        log.warning("manifest.parquet unreadable: the report leaves out counts by status and rejections")
        return None


def rejections(table) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Rows per status, and rejections per reason (most frequent first)."""

    def counted(column) -> dict:  # counted by Arrow: a manifest may hold millions of rows
        return {c["values"]: c["counts"] for c in pc.value_counts(column).to_pylist()}

    statuses = counted(table.column("status"))
    rejected = table.filter(pc.equal(table.column("status"), "rejected"))
    reasons = collections.Counter()
    for reason, n in counted(rejected.column("error")).items():
        reasons[reason if reason is not None else "(no reason recorded)"] += n
    return statuses, sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))


def choose_samples(table, count: int) -> list[dict]:
    """Up to ``count`` protected manifest rows: the first of each label (smallest labels first) where there are
    labels, else the first rows."""
    protected = table.filter(pc.equal(table.column("status"), "protected"))
    if protected.num_rows == 0 or count <= 0:
        return []
    labels = protected.column("label") if "label" in protected.column_names else None
    if labels is None or labels.null_count == protected.num_rows:
        indices = list(range(min(count, protected.num_rows)))
    else:
        distinct = sorted(v for v in pc.unique(labels).to_pylist() if v is not None)[:count]
        indices = sorted(pc.index(labels, v).as_py() for v in distinct)
    return protected.take(indices).to_pylist()


def _released_ext(row: dict) -> str | None:
    member = row.get("output_member")
    if not member:
        return None
    prefix = f"{row['key']}."
    return member[len(prefix) :] if member.startswith(prefix) else split_member_name(member)[1]


def _pixels(data: bytes, max_pixels: int) -> np.ndarray:
    """Upright 8-bit pixels as the release sees them: H x W for grayscale, H x W x 3 for colour (alpha left out)."""
    color = decode_image(data, max_pixels=max_pixels).color.numpy()
    return color[0] if color.shape[0] == 1 else np.ascontiguousarray(color.transpose(1, 2, 0))


def _find(url: str, keys: set[str]) -> dict[str, dict[str, bytes]]:
    """The members of ``keys`` in one shard (each key's first occurrence, as the release keeps it)."""
    found: dict[str, dict[str, bytes]] = {}
    for item in iter_samples(url):
        if isinstance(item, RawSample) and item.key in keys and item.key not in found:
            found[item.key] = item.members
            if len(found) == len(keys):
                break
    return found


def pick_samples(output: str, rows: list[dict], inputs: list[str] | None, config: dict) -> list[Shown]:
    """The released pixels of ``rows`` (manifest rows) and, from ``inputs``, their originals, matched by shard id
    and key."""
    output = fs.strip_url(output)
    layout = Layout(output, "")
    max_pixels = int(config.get("max_pixels") or 50_000_000)
    bound = round(float(config.get("eps") or 0) * 255)
    by_shard: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        by_shard[row["shard"]].append(row)
    input_urls: dict[str, str] = {}
    if inputs:
        from pipeline.plan import expand_inputs

        input_urls = {shard_id(u): u for u in expand_inputs(inputs)}
    shown: list[Shown] = []
    for shard, shard_rows in by_shard.items():
        released = _find(layout.shard_tar(shard), {r["key"] for r in shard_rows})
        originals = _find(input_urls[shard], {r["key"] for r in shard_rows}) if shard in input_urls else {}
        for row in shard_rows:
            members = released.get(row["key"])
            ext = _released_ext(row)
            ext = ext if members and ext in members else (find_image_member(members, None) if members else None)
            if ext is None:
                log.warning("sample %r of shard %s is not in its released shard", row["key"], shard)
                continue
            try:
                item = Shown(row["key"], shard, row.get("label"), _pixels(members[ext], max_pixels))
            except ImageRejected as exc:
                log.warning("released sample %r of shard %s does not decode: %s", row["key"], shard, exc)
                continue
            if not inputs:
                pass  # released images only: the page says why
            elif shard not in input_urls:
                item.note = f"no input shard {shard}.tar under --input"
            elif row["key"] not in originals:
                item.note = "key not found in its input shard"
            else:
                member = find_image_member(originals[row["key"]], config.get("image_key"))
                try:
                    item.original = _pixels(originals[row["key"]][member], max_pixels) if member else None
                except ImageRejected as exc:
                    item.note = f"the original does not decode: {exc}"
                if member is None:
                    item.note = "the input sample has no image member"
                elif item.original is not None and item.noise is None:
                    item.note = (
                        f"the original is {item.original.shape}, the released image {item.released.shape}: "
                        "--input is not this run's input"
                    )
                elif item.noise is not None and int(np.abs(item.noise).max()) > _moved(row, bound):
                    item.note = (
                        f"the original differs by {int(np.abs(item.noise).max())} levels, over the "
                        f"{_moved(row, bound)} the manifest records: --input is probably not this run's input"
                    )
            shown.append(item)
    order = {(r["shard"], r["key"]): i for i, r in enumerate(rows)}
    return sorted(shown, key=lambda s: order[(s.shard, s.key)])


def _moved(row: dict, bound: int) -> int:
    """How far the release may differ from its original: the manifest's linf (a lossy release's includes the
    codec's error), else the budget."""
    return int(row["linf"]) if row.get("linf") is not None else bound


def amplification(config: dict) -> int:
    """How much the noise picture scales δ: the budget (ε in uint8 levels) to about ±127 levels."""
    bound = round(float(config.get("eps") or 0) * 255)
    return max(1, 127 // bound) if bound else 1


def _thumbnail(pixels: np.ndarray, path: str) -> None:
    img = Image.fromarray(pixels, mode="L" if pixels.ndim == 2 else "RGB")
    scale = THUMB_PX / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    # Small images (MNIST, CIFAR) are enlarged pixel for pixel, so that the noise stays visible as it is.
    img = img.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)
    img.save(path, optimize=True)


def _rounds_figure(success: dict, path: str) -> None:
    history = success.get("history") or []
    p = success["protection"]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    rounds = [h["round"] for h in history]
    ax.plot(rounds, [h["error"] for h in history], "o-", color="C0", label="surrogate error on released data")
    probed = [(h["round"], h["probe_accuracy"]) for h in history if h.get("probe_accuracy") is not None]
    if probed:
        ax.plot(*zip(*probed), "s", color="C3", ms=7, label="probe accuracy (clean held-out)")
    stop_error = (success.get("config") or {}).get("stop_error")
    if stop_error is not None:
        ax.axhline(float(stop_error), color="C0", ls="--", lw=1, label="stop error")
    if p.get("threshold") is not None:
        ax.axhline(p["threshold"], color="C3", ls=":", lw=1.2, label="probe threshold")
    ax.set_xlabel("round")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(rounds if len(rounds) <= 30 else ax.get_xticks())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _battery_figure(p: dict, path: str) -> None:
    names = list(p["countermeasures"])
    cms = [p["countermeasures"][n] for n in names]
    xs = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2.5), 3.2))
    colors = ["C2" if c.get("holds") else "C3" for c in cms]
    ax.bar(xs - 0.2, [100 * c["accuracy"] for c in cms], 0.4, color=colors)
    ax.bar(
        xs + 0.2,
        [100 * c["early_stopped_accuracy"] for c in cms],
        0.4,
        color=colors,
        alpha=0.45,
        hatch="//",
        edgecolor="white",
    )
    ax.axhline(100 * p["threshold"], color="k", ls=":", lw=1.2)
    handles = [
        Patch(color="0.35", label="final"),
        Patch(facecolor="0.35", alpha=0.45, hatch="//", edgecolor="white", label="early-stopped"),
        Patch(color="C2", label="holds"),
        Patch(color="C3", label="does not hold"),
        Line2D([], [], color="k", ls=":", label="threshold"),
    ]
    if p.get("probe_clean_accuracy") is not None:
        ax.axhline(100 * p["probe_clean_accuracy"], color="C0", ls="--", lw=1)
        handles.append(Line2D([], [], color="C0", ls="--", label="probe trained on clean"))
    ax.set_xticks(xs, names, fontsize=8, rotation=20 if len(names) > 5 else 0, parse_math=False)
    ax.set_ylim(0, 110)
    ax.set_ylabel("probe accuracy on clean (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f}%"


def verdict(success: dict) -> dict:
    """What the page says about protection: ``holds`` (exactly ``protection.holds``), one summary clause, and the
    warnings to show at the top."""
    p = success["protection"]
    holds = p.get("holds") is True
    worst = p.get("worst_case")
    warnings = []
    if not holds:
        if p.get("why"):  # the run said why its probe cannot certify it (--labels cluster)
            why = p["why"]
        elif p.get("probe_clean_accuracy") is not None and p["probe_clean_accuracy"] <= p["threshold"]:
            why = (
                f"the probe learns only {_pct(p['probe_clean_accuracy'])} from clean data, so it cannot tell "
                "whether the noise protects"
            )
        elif worst and worst.get("accuracy", 0) > p["threshold"]:
            why = (
                f"a fresh {p.get('arch', 'probe')} trained on the release reaches {_pct(worst['accuracy'])} on clean "
                f"held-out images under {worst['countermeasure']} (threshold {_pct(p['threshold'])})"
            )
        else:
            why = (
                f"a fresh {p.get('arch', 'probe')} trained on the release reaches {_pct(p['probe_accuracy'])} on "
                f"clean held-out images (threshold {_pct(p['threshold'])})"
            )
        warnings.append(f"NOT PROTECTED: {why}. The release is written, but it does not make these images unlearnable.")
    if success.get("stop_reason") == "max_rounds":
        warnings.append(f"The run reached --max-rounds ({success.get('rounds')}) without meeting the stop rule.")
    clause = f"probe {_pct(p.get('probe_accuracy'))} (threshold {_pct(p.get('threshold'))})"
    if worst:
        clause += f", worst case of the battery {_pct(worst['accuracy'])} under {worst['countermeasure']}"
    clause += ": protection holds" if holds else ": protection does NOT hold"
    return {"holds": holds, "clause": clause, "warnings": warnings}


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#1d1d1f;line-height:1.4}
h1{font-size:1.5em;margin-bottom:.2em;word-break:break-all}h2{font-size:1.2em;margin-top:1.8em;
border-bottom:1px solid #ddd;padding-bottom:.2em}
.warn{background:#fde8e8;border:2px solid #c81e1e;color:#8a1010;padding:.8em 1em;margin:1em 0;font-weight:600}
.ok{background:#e7f6ec;border:1px solid #2e7d4f;padding:.6em 1em;margin:1em 0}
.summary{background:#f4f4f6;border:1px solid #bbb;padding:.6em 1em;margin:1em 0}
.cols{display:flex;flex-wrap:wrap;gap:0 24px;align-items:flex-start}
.note{color:#555;font-size:.92em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b00;font-weight:600}.good{color:#17622f}
.samples{display:flex;flex-wrap:wrap;gap:14px}
.sample{border:1px solid #ddd;padding:6px;max-width:470px}
.sample .imgs{display:flex;gap:6px}
.sample figure{margin:0;text-align:center;font-size:.8em;color:#555}
.sample img{display:block;image-rendering:pixelated;background:#eee}
.key{font-family:ui-monospace,monospace;font-size:.85em;word-break:break-all;margin-bottom:4px}
img.fig{max-width:100%;height:auto}
.bar{display:inline-block;height:.8em;background:#5b8def;vertical-align:middle}
code{font-size:.9em}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            raw = isinstance(cell, _Raw)
            text = cell.html if raw else _e(cell)
            cells.append(f'<td class="n">{text}</td>' if i in numeric else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table>"


@dataclass
class _Raw:
    """Markup this module built (escaped parts only): a table cell that is not escaped again."""

    html: str


def _setting(name: str, value) -> str:
    """A config value as JSON, with budgets also in uint8 levels (eps 0.0313... is 8/255)."""
    text = json.dumps(value, default=str)
    if name in ("eps", "step_size") and isinstance(value, (int, float)) and not isinstance(value, bool):
        text += f" (= {value * 255:.4g}/255)"
    return text


def _holds_cell(holds) -> _Raw:
    return _Raw('<span class="good">holds</span>' if holds else '<span class="bad">does NOT hold</span>')


def write_run_report(
    output: str, inputs: list[str] | None = None, out: str | None = None, samples: int = DEFAULT_SAMPLES
) -> str:
    """Write ``report.html`` and its figures for the finished run at ``output``; return the page's path."""
    output = fs.strip_url(output)
    success = read_success(output)
    folder = report_dir(output, out)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if OWN_FILES.fullmatch(name):
            os.remove(os.path.join(folder, name))
    config = success.get("config") or {}
    table = read_manifest(output)
    rows = choose_samples(table, samples) if table is not None else []
    shown = pick_samples(output, rows, inputs, config)
    amp = amplification(config)
    v = verdict(success)
    p = success["protection"]
    counts = success.get("counts") or {}
    body: list[str] = [f"<h1>unlearnable report: {_e(output)}</h1>"]
    for w in v["warnings"]:
        body.append(f'<div class="warn">{_e(w)}</div>')
    summary = (
        f"{counts.get('protected', '?')} protected and {counts.get('rejected', '?')} rejected of "
        f"{counts.get('input', '?')} input samples; {success.get('rounds', '?')} round(s), stop reason "
        f"{success.get('stop_reason', '?')}; {v['clause']}."
    )
    body.append(f'<p class="{"ok" if v["holds"] else "summary"}" id="summary">{_e(summary)}</p>')

    # Samples
    body.append("<h2>Samples</h2>")
    if not inputs:
        body.append(
            '<p class="note">Released images only: <code>_SUCCESS.json</code> does not name the inputs (where '
            "the originals live stays private, in the work dir's run.json), so the originals and the noise "
            "cannot be shown. Pass <code>--input</code> with the run's input shards to see them.</p>"
        )
    else:
        body.append(
            f'<p class="note">Original, the noise (released − original, ×{amp}, mid-grey = 0) and the released '
            "image, matched by shard and key"
            + (", one sample per label" if any(s.label is not None for s in shown) else "")
            + ".</p>"
        )
    if not shown:
        body.append(
            '<p class="note">No protected sample to show'
            + (" (manifest.parquet is missing or unreadable)." if table is None else ".")
            + "</p>"
        )
    body.append('<div class="samples">')
    for i, s in enumerate(shown):
        pictures = []
        if s.original is not None:
            _thumbnail(s.original, os.path.join(folder, f"sample-{i:02d}-original.png"))
            pictures.append((f"sample-{i:02d}-original.png", "original"))
        if s.noise is not None:
            noise = np.clip(128 + s.noise * amp, 0, 255).astype(np.uint8)
            _thumbnail(noise, os.path.join(folder, f"sample-{i:02d}-noise.png"))
            pictures.append((f"sample-{i:02d}-noise.png", f"noise ×{amp}"))
        _thumbnail(s.released, os.path.join(folder, f"sample-{i:02d}-released.png"))
        pictures.append((f"sample-{i:02d}-released.png", "released"))
        h, w = s.released.shape[:2]
        caption = f"{s.shard} / {s.key}" + (f" — label {s.label}" if s.label is not None else "") + f" — {w}×{h}"
        figs = "".join(
            f'<figure><img src="{_e(src)}" alt="{_e(alt)}"><figcaption>{_e(alt)}</figcaption></figure>'
            for src, alt in pictures
        )
        note = f'<div class="note">{_e(s.note)}</div>' if s.note else ""
        body.append(
            f'<div class="sample"><div class="key">{_e(caption)}</div><div class="imgs">{figs}</div>{note}</div>'
        )
    body.append("</div>")

    # Rounds
    history = success.get("history") or []
    body.append("<h2>Rounds</h2>")
    if history:
        _rounds_figure(success, os.path.join(folder, "rounds.png"))
        body.append('<img class="fig" src="rounds.png" alt="surrogate error and probe accuracy per round">')
        body.append(
            _table(
                ["round", "surrogate error on released data", "probe accuracy", "PGD image-steps"],
                [
                    [
                        h["round"],
                        f"{h['error']:.4f}",
                        _pct(h.get("probe_accuracy")) if h.get("probe_accuracy") is not None else "",
                        h.get("image_steps", ""),
                    ]
                    for h in history
                ],
                numeric={0, 1, 2, 3},
            )
        )
    body.append(
        f"<p>Final surrogate error on released data: {_e(success.get('surrogate_error'))}; stop error "
        f"{_e(config.get('stop_error'))}; stop reason <code>{_e(success.get('stop_reason'))}</code>.</p>"
    )

    # Probe
    body.append("<h2>Protection probe</h2>")
    body.append(
        f"<p>A fresh {_e(p.get('arch', 'probe'))} trained for {_e(p.get('steps', '?'))} steps on released "
        f"images and scored on clean held-out originals: <b>{_e(_pct(p.get('probe_accuracy')))}</b>; the same "
        f"probe trained on clean images: {_e(_pct(p.get('probe_clean_accuracy')))}; chance "
        f"{_e(_pct(p.get('chance')))}; threshold {_e(_pct(p.get('threshold')))}. The plain probe "
        f"{_holds_cell(p.get('probe_holds', p.get('holds'))).html}; the release (the plain probe and every "
        f"countermeasure of its battery): {_holds_cell(v['holds']).html}.</p>"
    )
    if p.get("countermeasures"):
        _battery_figure(p, os.path.join(folder, "battery.png"))
        body.append(
            "<p>The probe's countermeasure battery (what an informed adversary trains with): the release is "
            "protected only when every countermeasure holds, final and early-stopped.</p>"
        )
        body.append(
            _table(
                ["countermeasure", "final", "early-stopped", "best epoch", "worst", "verdict"],
                [
                    [
                        name,
                        _pct(c.get("accuracy")),
                        _pct(c.get("early_stopped_accuracy")),
                        c.get("best_epoch", ""),
                        _pct(c.get("worst")),
                        _holds_cell(c.get("holds")),
                    ]
                    for name, c in p["countermeasures"].items()
                ],
                numeric={1, 2, 3, 4},
            )
        )
        body.append('<img class="fig" src="battery.png" alt="the probe\'s countermeasure battery">')
        if p.get("worst_case"):
            w = p["worst_case"]
            body.append(
                f"<p>Worst case: <b>{_e(_pct(w.get('accuracy')))}</b> under "
                f"<code>{_e(w.get('countermeasure'))}</code>.</p>"
            )
    else:
        body.append(
            '<p class="note">No countermeasure battery in this run (the plain probe only): an informed '
            "adversary was not tested.</p>"
        )

    # Counts and rejections
    body.append("<h2>Counts and rejections</h2>")
    body.append(
        _table(
            ["input", "protected", "rejected", "shards"],
            [
                [
                    counts.get("input", ""),
                    counts.get("protected", ""),
                    counts.get("rejected", ""),
                    success.get("shards", ""),
                ]
            ],
            numeric={0, 1, 2, 3},
        )
    )
    if table is None:
        body.append(
            '<p class="warn">manifest.parquet is missing or unreadable: rejections by reason cannot be shown '
            f"(<code>unlearnable verify {_e(output)}</code>).</p>"
        )
    else:
        statuses, reasons = rejections(table)
        manifest_counts = {
            "input": table.num_rows,
            "protected": statuses.get("protected", 0),
            "rejected": statuses.get("rejected", 0),
        }
        if {k: counts.get(k) for k in manifest_counts} != manifest_counts:
            body.append(
                f'<p class="warn">manifest.parquet counts {_e(manifest_counts)}, _SUCCESS.json '
                f"{_e(counts)}: <code>unlearnable verify {_e(output)}</code>.</p>"
            )
        if reasons:
            body.append(
                _table(["rejection reason (manifest error)", "samples"], [[r, n] for r, n in reasons], numeric={1})
            )
        else:
            body.append("<p>No sample was rejected.</p>")

    # Timings
    timings = success.get("timings") or {}
    if timings:
        body.append("<h2>Timings</h2>")
        total = float(timings.get("total") or sum(v for k, v in timings.items() if k != "total") or 1)
        rows_t = []
        for k, t in timings.items():
            share = float(t) / total if total else 0
            bar = _Raw(f'<span class="bar" style="width:{round(200 * min(1.0, share))}px"></span> {100 * share:.0f}%')
            rows_t.append([k, f"{float(t):.1f}", bar if k != "total" else ""])
        body.append(_table(["stage", "seconds", "share of total"], rows_t, numeric={1}))

    # Config
    body.append("<h2>Configuration</h2>")
    body.append(
        '<p class="note">As <code>_SUCCESS.json</code> records it: the inputs and the work dir are private '
        "and stay in the work dir's run.json.</p>"
    )
    settings = [[k, _setting(k, val)] for k, val in config.items()]
    half = (len(settings) + 1) // 2
    body.append(
        f'<div class="cols">{_table(["setting", "value"], settings[:half])}'
        f"{_table(['setting', 'value'], settings[half:])}</div>"
        if settings
        else "<p>(none recorded)</p>"
    )
    extra = [
        [k, json.dumps(success[k], default=str)]
        for k in ("config_hash", "plan_digest", "image_steps", "versions")
        if k in success
    ]
    if extra:
        body.append(_table(["run", "value"], extra))

    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>unlearnable report: {_e(output)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path = os.path.join(folder, HTML_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
