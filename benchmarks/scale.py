"""The run's bookkeeping at a million samples: plan, status, the manifest merge and verify, timed, with peak RSS.

    python benchmarks/scale.py --shards 10000 --per-shard 100 --out /tmp/scale

Builds (once, under ``--out``) an input corpus of ``--shards`` shards of ``--per-shard`` tiny real PNG images with
labels, and the release a finished run would leave for it, written with the pipeline's own writers: each shard's tar,
Parquet manifest and marker (``pipeline.storage``), the run record, plan and a final round marker in the work dir.
(No noise is computed: the images are released as they are. What is measured is everything around the rounds.)
Then each step runs in a fresh process, so that its peak RSS (``ru_maxrss``) is its own:

- ``plan``: ``build_plan`` over the input shards, every sample read in this process, one shard at a time;
- ``plan-ray``: the same plan read as ``protect`` and ``--dry-run`` read it, one Ray task a shard on a local Ray
  started for it (its start is in the time);
- ``status``: ``unlearnable status`` of the run in its export stage (every shard's marker read);
- ``merge``: ``manifest.parquet`` merged from the shards' manifests (what the export's last step does);
- ``verify``: ``unlearnable verify`` of the finished release (every tar hashed, every row checked; on a process a
  CPU);
- ``verify-1``: the same on this process alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHASH = "0123456789abcdef"
STEPS = ("plan", "plan-ray", "status", "merge", "verify", "verify-1")


def build(out: str, shards: int, per_shard: int) -> None:
    from pipeline.plan import Plan, ShardPlan
    from pipeline.storage import fs, manifest
    from pipeline.storage.layout import Layout
    from pipeline.storage.markers import commit_files, write_marker
    from pipeline.storage.shards import RawSample, write_tar

    inputs, layout = os.path.join(out, "inputs"), Layout(os.path.join(out, "release"), os.path.join(out, "work"))
    if fs.exists(os.path.join(out, "built.json")):
        return
    os.makedirs(inputs, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(1000):  # distinct 8x8 gray images, reused under different keys
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(buf, format="PNG")
        images.append(buf.getvalue())
    plan_shards = []
    t0 = time.perf_counter()
    for s in range(shards):
        sid = f"s{s:06d}"
        samples = [
            RawSample(f"{sid}-{i:04d}", {"png": images[(s * per_shard + i) % len(images)], "cls": str(i % 10).encode()})
            for i in range(per_shard)
        ]
        data = write_tar(samples)
        with open(os.path.join(inputs, f"{sid}.tar"), "wb") as f:
            f.write(data)
        rows = [
            manifest.row(
                x.key,
                sid,
                "protected",
                label=i % 10,
                width=8,
                height=8,
                output_sha256=_sha(x.members["png"]),
                output_member=f"{x.key}.png",
                linf=0,
                l2=0.0,
                psnr=99.0,
            )
            for i, x in enumerate(samples)
        ]
        man = manifest.to_parquet(rows)
        stats = {
            "shard": sid,
            "input": per_shard,
            "protected": per_shard,
            "rejected": 0,
            "linf_max": 0,
            "read_error": None,
            "tar_bytes": len(data),
            "manifest_bytes": len(man),
        }
        commit_files(
            {"tar": (layout.shard_tar(sid), data), "manifest": (layout.shard_manifest(sid), man)},
            layout.shard_marker(sid),
            CHASH,
            **stats,
        )
        plan_shards.append(ShardPlan(sid, os.path.join(inputs, f"{sid}.tar"), per_shard))
        if (s + 1) % 1000 == 0:
            print(f"built {s + 1}/{shards} shards, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    plan = Plan(tuple(plan_shards), 10, 1)
    fs.write_bytes(layout.plan, plan.to_parquet())
    config = {"eps": 8 / 255, "max_rounds": 1, "encode_format": "png"}
    fs.write_bytes(
        layout.run_record, json.dumps({"config": config, "config_hash": CHASH, "plan_digest": plan.digest}).encode()
    )
    write_marker(layout.round_marker(0), CHASH, round=0, error=0.0, stop=True, seconds={"noise": 1.0})
    with open(os.path.join(out, "built.json"), "w") as f:
        json.dump({"shards": shards, "per_shard": per_shard, "config": config}, f)


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def step(out: str, name: str) -> dict:
    from pipeline import inspection
    from pipeline.plan import Plan, build_plan
    from pipeline.stages.export import merge_manifests
    from pipeline.storage import fs
    from pipeline.storage.layout import Layout

    layout = Layout(os.path.join(out, "release"), os.path.join(out, "work"))
    with open(os.path.join(out, "built.json")) as f:
        built = json.load(f)
    t0 = time.perf_counter()
    result: dict = {}
    if name in ("plan", "plan-ray"):
        from pipeline.executor import ray_pool
        from pipeline.plan import read_here

        reader = ray_pool.PlanReader(None) if name == "plan-ray" else read_here
        plan = build_plan([os.path.join(out, "inputs")], None, None, "cls", reader=reader)
        result = {"samples": plan.total_samples}
        ray_pool.shutdown(getattr(reader, "started", False))
    elif name == "status":
        fs.remove(layout.success)
        info = inspection.status(layout.output, layout.work)
        result = {"stage": info.get("stage"), "shards": info.get("shards")}
    elif name == "merge":
        plan = Plan.from_parquet(fs.read_bytes(layout.plan))
        result = {"counts": merge_manifests(layout, plan, False)}
        success = {
            "config": built["config"],
            "config_hash": CHASH,
            "counts": result["counts"],
            "shards": built["shards"],
        }
        fs.write_bytes(layout.success, json.dumps(success).encode())
    elif name in ("verify", "verify-1"):
        if name == "verify-1":
            inspection.PARALLEL_FROM = float("inf")
        verdict = inspection.verify(layout.output)
        result = {"ok": verdict.ok, "problems": verdict.problems[:3], "rows": verdict.summary.get("input")}
    return {
        "step": name,
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        **result,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--out", default="/tmp/scale")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps to time (default: all)")
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.step:
        print(json.dumps(step(args.out, args.step)))
        return 0
    t0 = time.perf_counter()
    build(args.out, args.shards, args.per_shard)
    print(f"corpus and release built in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for name in args.steps.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, "--step", name, "--out", args.out], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(f"| step ({args.shards:,} shards, {args.shards * args.per_shard:,} samples) | seconds | peak RSS |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']} | {r['peak_rss_mb']:,} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
