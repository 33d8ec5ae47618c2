"""``unlearnable bench``: how fast the noise step runs, against what, and how much of it a whole round keeps.

Three measurements in one run, on the same device:

1. **step**: image-steps per second of the noise engine (``ops.engine.NoiseEngine``) and of the same update computed
   the way the paper's code does it (``ops.engine.reference_noise_pass``: fp32 eager, per-sample host round trips),
   their ratio, and the surrogate's loss after each (the engine must not buy speed with weaker noise);
2. **roofline** (GPU only): FLOPs per image-step counted with ``torch.utils.flop_counter`` and the fraction of a bf16
   matmul's rate, measured in the same run, that the engine reaches (MFU);
3. **round**: a whole round of the run's own stages (``coordinator.Run`` on the in-process executor: no Ray), on
   synthetic shards written to a temp dir: decode, train stage, noise stage, stop check on released data, each with
   its commits to the work dir; its image-steps per second as a fraction of the step rate shows what the pipeline
   costs on top of the step.

Synthetic images are fine here: the bench is about bytes and speed, not learning. No figure is asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import json
import logging
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from ops.choices import PRECISIONS
from ops.engine import NoiseEngine, reference_noise_pass, to_device
from ops.noise import project

log = logging.getLogger(__name__)

EPS = 8 / 255


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--surrogate", default=None, help="surrogate to time (default: resnet18 on a GPU, small-cnn on CPU)")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=None, help="images per PGD batch (default: 512 GPU, 128 CPU)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="auto", help="the engine's precision")
    p.add_argument("--steps", type=int, default=20, help="PGD steps per batch (one timed iteration)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations of each variant (after one warm-up)")
    p.add_argument("--channels", type=int, default=3, help="image channels")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the engine's surrogate (default: on a GPU only)",
    )
    p.add_argument(
        "--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs) or max-autotune"
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on)",
    )
    p.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the paper-style fp32 eager baseline too",
    )
    p.add_argument(
        "--round",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a whole round in-process on generated shards",
    )
    p.add_argument("--round-shards", type=int, default=2, help="generated shards for the round")
    p.add_argument("--round-samples", type=int, default=None, help="samples per shard (default: 2 x batch size)")
    p.add_argument(
        "--train-steps",
        type=int,
        default=10,
        help="surrogate SGD steps in the round's train stage, and before the step is timed",
    )
    p.add_argument(
        "--train-batch-size",
        type=int,
        default=None,
        help="the round's training batch (default: --batch-size, which is the noise batch)",
    )
    p.add_argument(
        "--native-size",
        type=int,
        default=None,
        help="side of the round's generated images (default: --resolution); another size makes decode, "
        "the stop check and the release resize every image, as with photos",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--check",
        action="store_true",
        help="also check correctness on this device (noise within eps and as strong as the baseline's, "
        "no compile fallback, the round's released images equal to the export's per-image release on "
        "the CPU within one level); exit 1 when a check fails",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _timed(stages: dict, name: str, device: torch.device):
    """Seconds of the block, device work included, into ``stages[name]``."""
    t = time.perf_counter()
    yield
    _sync(device)
    stages[name] = time.perf_counter() - t


def _surrogate_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> float:
    """The fp32 surrogate loss at clip(x + delta): what the noise update minimises (lower is stronger noise)."""
    with torch.no_grad():
        return float(F.cross_entropy(model((x + delta).clamp(0, 1)).float(), y))


def count_step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one PGD step on the batch (forward, backward to the image only), by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        image = x.clone().requires_grad_(True)
        with FlopCounterMode(display=False) as counter:
            # .backward(), not autograd.grad: the counter's module tracker does not support the latter on a leaf.
            F.cross_entropy(model(image), y).backward()
            project(-image.grad.sign(), x, EPS)
        return int(counter.get_total_flops())
    finally:
        for p in params:
            p.requires_grad_(True)


def matmul_flops_per_s(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """The rate of a bf16 n^3 matmul on this device: the peak the MFU figure is measured against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def bench_step(args: argparse.Namespace, device: torch.device) -> dict:
    from surrogates import build
    from surrogates.training import make_optimizer, train_step

    torch.manual_seed(args.seed)
    model = build(args.surrogate, args.num_classes, args.channels).to(device)
    g = torch.Generator().manual_seed(args.seed)
    b, r = args.batch_size, args.resolution
    x_host = torch.rand(b, args.channels, r, r, generator=g)
    y_host = torch.randint(0, args.num_classes, (b,), generator=g)
    # Timed on a surrogate trained --train-steps steps (on this batch), as the round's noise stage follows its train
    # stage: a freshly initialised small CNN ran 1.1-1.4x slower per step than a trained one on a CPU here, which
    # made the round look faster than the step. Training also lets the PGD steps move the loss (the quality check).
    x, y = to_device(x_host, device), to_device(y_host, device)  # once per shard, through pinned memory
    optimizer = make_optimizer(model)
    for _ in range(args.train_steps):
        train_step(model, optimizer, x, y)
    model.eval().zero_grad(set_to_none=True)
    baseline_model = copy.deepcopy(model)  # the engine may convert its model to channels_last; the baseline must not
    step_size = EPS / 10
    out: dict = {
        "surrogate": args.surrogate,
        "resolution": r,
        "batch_size": b,
        "steps": args.steps,
        "iters": args.iters,
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    work = b * args.steps  # image-steps per timed iteration

    if args.baseline:
        noise = torch.zeros_like(x_host)
        reference_noise_pass(
            baseline_model,
            x_host,
            y_host,
            noise.clone(),
            eps=EPS,
            step_size=step_size,
            steps=args.steps,
            batch_size=b,
            device=device,
        )  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.iters):
            noise = reference_noise_pass(
                baseline_model,
                x_host,
                y_host,
                noise,
                eps=EPS,
                step_size=step_size,
                steps=args.steps,
                batch_size=b,
                device=device,
            )
        _sync(device)
        seconds = time.perf_counter() - t0
        out["baseline_img_steps_per_s"] = work * args.iters / seconds
        out["baseline_loss_after"] = _surrogate_loss(
            baseline_model, x_host.to(device), y_host.to(device), noise.to(device)
        )

    engine = NoiseEngine(
        model,
        eps=EPS,
        step_size=step_size,
        steps=args.steps,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        compile_mode=args.compile_mode,
    )
    delta = torch.zeros_like(x)
    t0 = time.perf_counter()
    engine.minimize(x, y, delta.clone(), pad_to=b)  # warm-up: compiles here when compiling
    _sync(device)
    out["engine_warmup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.iters):
        delta = engine.minimize(x, y, delta, pad_to=b)
    _sync(device)
    seconds = time.perf_counter() - t0
    out["engine_img_steps_per_s"] = work * args.iters / seconds
    out["engine"] = engine.describe()
    out["engine_loss_after"] = _surrogate_loss(model, x, y, delta)
    out["loss_before"] = _surrogate_loss(model, x, y, torch.zeros_like(x))
    out["engine_linf"] = float(delta.abs().max())
    if "baseline_img_steps_per_s" in out:
        out["ratio"] = out["engine_img_steps_per_s"] / out["baseline_img_steps_per_s"]
    if args.check:
        checks = {
            "engine |delta| <= eps": out["engine_linf"] <= EPS + 1e-6,
            "compiled when asked (no fallback)": not (engine.compile_requested and engine.fallback_reason),
        }
        if "baseline_loss_after" in out:
            # Same updates from the same start: the engine's noise must be as strong (bf16 may differ a little).
            checks["engine loss after <= baseline's + 0.02"] = (
                out["engine_loss_after"] <= out["baseline_loss_after"] + 0.02
            )
        out["checks"] = checks

    small = min(b, 8)
    flops = count_step_flops(baseline_model, x[:small], y[:small]) / small
    out["gflop_per_img_step"] = flops / 1e9
    out["engine_tflop_per_s"] = flops * out["engine_img_steps_per_s"] / 1e12
    out["mfu"] = None
    if device.type == "cuda":
        peak = matmul_flops_per_s(device)
        out["bf16_matmul_tflop_per_s"] = peak / 1e12
        out["mfu"] = flops * out["engine_img_steps_per_s"] / peak
    return out


def _synthetic_shards(
    root: str, shards: int, per_shard: int, size: int, channels: int, num_classes: int, seed: int
) -> list[tuple[str, str]]:
    """Shards of smooth random images (PNG, like photos: not incompressible noise) with ``cls`` labels."""
    from ops.image import encode_png
    from pipeline.storage.shards import RawSample, write_tar

    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(shards):
        coarse = torch.rand(per_shard, channels, 8, 8, generator=g)
        imgs = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        imgs = (imgs + 0.05 * torch.randn(imgs.shape, generator=g)).clamp(0, 1).mul(255).round().to(torch.uint8)
        labels = torch.randint(0, num_classes, (per_shard,), generator=g).tolist()
        samples = [
            RawSample(f"s{s:03d}-{i:06d}", {"png": encode_png(imgs[i]), "cls": str(labels[i]).encode()})
            for i in range(per_shard)
        ]
        shard_id = f"bench-{s:06d}"
        path = os.path.join(root, f"{shard_id}.tar")
        with open(path, "wb") as f:
            f.write(write_tar(samples))
        out.append((shard_id, path))
    return out


def bench_round(args: argparse.Namespace, step_rate: float) -> dict:
    """Two rounds of the run's own stages (``coordinator.Run`` on the in-process executor, ``pipeline.executor.local``:
    no Ray) over synthetic shards in a temp dir; the second round (warm: compiled, caches filled) is reported. Each
    stage's time includes its commits (the checkpoint; every shard's noise state, written on a thread while the next
    shard computes, and waited for at the end of the stage). The probe is not run: it is not per-round work."""
    from pipeline.config import ProtectConfig
    from pipeline.coordinator import Run
    from pipeline.executor import local
    from pipeline.prepare import prepare_run

    per_shard = args.round_samples or 2 * args.batch_size
    with tempfile.TemporaryDirectory(prefix="unlearnable-bench-") as tmp:
        data = os.path.join(tmp, "in")
        os.makedirs(data)
        t0 = time.perf_counter()
        _synthetic_shards(
            data,
            args.round_shards,
            per_shard,
            args.native_size or args.resolution,
            args.channels,
            args.num_classes,
            args.seed,
        )
        generate_s = time.perf_counter() - t0
        cfg = ProtectConfig(
            inputs=[data],
            output=os.path.join(tmp, "out"),
            surrogate=args.surrogate,
            resolution=args.resolution,
            pgd_steps=args.steps,
            train_steps=args.train_steps,
            batch_size=args.train_batch_size or args.batch_size,
            noise_batch_size=args.batch_size,
            num_classes=args.num_classes,
            precision=args.precision,
            seed=args.seed,
            max_rounds=2,
            probe_countermeasures="none",
            keep_work=True,
        )
        prepared = prepare_run(cfg)
        run = Run(cfg, prepared.layout, prepared.plan, prepared.chash, executor=local)
        run.start_workers()  # as a pool worker loads its share: the next shard read while one decodes
        worker = run.workers[0].worker
        _sync(worker.device)
        decode_s = run.timings["load"]
        if args.channels_last is not None or args.compile is not None or args.compile_mode is not None:
            # The round runs the engine the step was timed with, so that the fraction compares like with like.
            if args.channels_last is False:
                worker.model.to(memory_format=torch.contiguous_format)
            worker.engine = NoiseEngine(
                worker.model,
                eps=cfg.eps,
                step_size=cfg.step_size,
                steps=cfg.pgd_steps,
                precision=cfg.precision,
                channels_last=args.channels_last,
                compile=args.compile,
                compile_mode=args.compile_mode,
            )
        for r in range(2):
            record = run._round(r, None, final=False, probe=False)
        stages = {k: record["seconds"][k] for k in ("train", "noise", "check")}
        image_steps = record["image_steps"]
        checks = _check_release(worker, prepared.plan.shards[0].id) if args.check else None
        round_s = sum(stages.values())
        rate = image_steps / round_s
        return {
            "samples": per_shard * args.round_shards,
            "native_size": args.native_size or args.resolution,
            "train_batch_size": cfg.batch_size,
            "shards": args.round_shards,
            "image_steps": image_steps,
            "generate_shards_s": generate_s,
            "decode_s": decode_s,
            **{f"{k}_s": v for k, v in stages.items()},
            "round_s": round_s,
            "round_img_steps_per_s": rate,
            "noise_stage_img_steps_per_s": image_steps / stages["noise"],
            "fraction_of_step_rate": rate / step_rate if step_rate else None,
            "with_decode_img_steps_per_s": image_steps / (round_s + decode_s),
            "engine": worker.engine.describe(),
            **({"checks": checks} if checks is not None else {}),
        }


def _check_release(worker, shard: str, limit: int = 64) -> dict:
    """The stop check's released images (on the worker's device, a size group at a time) against the export's
    per-image release on the CPU: the same pixels up to float rounding on another device."""
    from ops.image import release_native, to_working

    sd = worker.shards[shard]
    n = min(limit, sd.end - sd.start)
    on_device = worker.released_working(shard)[:n].cpu().to(torch.int32)
    noise = worker.noise_rows(slice(sd.start, sd.start + n)).cpu()
    natives = itertools.islice(worker._natives(sd), n)  # kept, or decoded again (--cache)
    reference = torch.stack(
        [
            to_working(release_native(nat.color, noise[i]), worker.cfg.resolution, worker.channels)
            for i, nat in enumerate(natives)
        ]
    ).to(torch.int32)
    diff = (on_device - reference).abs()
    return {
        "stop-check images within 1 level of the export's": int(diff.max()) <= 1,
        "stop-check images >= 99.9% identical pixels": float((diff == 0).float().mean()) >= 0.999,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{os.cpu_count()}-core {platform.machine()} CPU"


def run_bench(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.surrogate is None:
        args.surrogate = "resnet18" if device.type == "cuda" else "small-cnn"
    if args.batch_size is None:
        args.batch_size = 512 if device.type == "cuda" else 128
    for name in ("resolution", "batch_size", "steps", "iters", "round_shards", "train_batch_size", "native_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    result = bench_step(args, device)
    result["round"] = bench_round(args, result["engine_img_steps_per_s"]) if args.round else None
    return result


def format_table(res: dict) -> str:
    e = res["engine"]
    head = (
        f"unlearnable bench: {res['surrogate']} at {res['resolution']} px, batch {res['batch_size']}, "
        f"{res['steps']} steps x {res['iters']} iters on {res['device']} (torch {res['torch']}, "
        f"{res['threads']} threads)"
    )
    rows = [("variant", "img-steps/s", "loss after", "notes")]
    if "baseline_img_steps_per_s" in res:
        rows.append(
            (
                "baseline (paper-style fp32 eager)",
                f"{res['baseline_img_steps_per_s']:,.1f}",
                f"{res['baseline_loss_after']:.4f}",
                "per-sample host round trips, param grads",
            )
        )
    notes = (
        f"{e['precision']}, channels_last={'on' if e['channels_last'] else 'off'}, "
        f"compile={'on' if e['compile'] else 'off'}"
        + (f" ({e['compile_mode']})" if e["compile_mode"] else "")
        + (f", fallback: {e['fallback']}" if e["fallback"] else "")
        + f"; warm-up {res['engine_warmup_s']:.1f} s"
    )
    rows.append(("engine", f"{res['engine_img_steps_per_s']:,.1f}", f"{res['engine_loss_after']:.4f}", notes))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    if "ratio" in res:
        lines.append(f"ratio engine / baseline: {res['ratio']:.2f}x")
    lines.append(
        f"loss before the update {res['loss_before']:.4f}; engine max |delta| {res['engine_linf']:.5f} (eps {EPS:.5f})"
    )
    lines.append(
        f"FLOPs per image-step {res['gflop_per_img_step']:.3f} GFLOP (torch.utils.flop_counter); "
        f"engine {res['engine_tflop_per_s'] * 1e3:,.1f} GFLOP/s"
    )
    if res.get("mfu") is not None:
        lines.append(f"bf16 matmul {res['bf16_matmul_tflop_per_s']:,.0f} TFLOP/s measured; MFU {100 * res['mfu']:.1f}%")
    else:
        lines.append("MFU: GPU only (no CUDA device)")
    rd = res.get("round")
    if rd:
        lines += [
            "",
            (
                f"whole round in-process ({rd['samples']} samples of {rd['native_size']} px in {rd['shards']} "
                f"generated shards, train batch {rd['train_batch_size']}, {rd['image_steps']:,} image-steps; "
                f"decode once {rd['decode_s']:.2f} s):"
            ),
        ]
        lines.append(
            "  "
            + "  ".join(f"{k} {rd[k + '_s']:.2f} s" for k in ("train", "noise", "check"))
            + f"  = round {rd['round_s']:.2f} s"
        )
        frac = rd["fraction_of_step_rate"]
        lines.append(
            f"  round {rd['round_img_steps_per_s']:,.1f} img-steps/s = "
            f"{100 * frac:.0f}% of the engine's step rate (noise stage alone "
            f"{rd['noise_stage_img_steps_per_s']:,.1f}; with decode {rd['with_decode_img_steps_per_s']:,.1f})"
        )
    return "\n".join(lines)


def failed_checks(res: dict) -> list[str]:
    checks = {**res.get("checks", {}), **((res.get("round") or {}).get("checks") or {})}
    return [name for name, ok in checks.items() if not ok]


def bench_cli(args: argparse.Namespace) -> int:
    try:
        res = run_bench(args)
    except ValueError as exc:
        print(f"unlearnable bench: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2, default=str) if args.json else format_table(res))
    if args.check:
        failed = failed_checks(res)
        print(f"checks: {'FAILED: ' + '; '.join(failed) if failed else 'all passed'}", file=sys.stderr)
        return 1 if failed else 0
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.bench``: the same command without the rest of the CLI (which needs Ray importable)."""
    parser = argparse.ArgumentParser(
        prog="unlearnable bench", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_bench_args(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return bench_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
