"""The ``unlearnable`` command line: protect, evaluate, demo, bench, status, verify, make-shards.

Exit status: 0 complete and protected; 2 bad arguments or a refused config; 3 incomplete (a rerun resumes);
4 complete but the protection probe does not hold. Whenever it is not 0, one line on stderr says why.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ops.choices import (
    COMPILE_CHOICES,
    CONVERGED_LOSS,
    DEFAULT_ENCODE_QUALITY,
    ENCODE_FORMATS,
    PRECISIONS,
    ROBUST_CHOICES,
)
from pipeline.config import CACHE_CHOICES, PROBE_MARGIN, ProtectConfig
from pipeline.exits import EXIT_BAD_ARGS, EXIT_INCOMPLETE, EXIT_VERIFY_FAILED
from pipeline.lease import LeaseHeld

log = logging.getLogger("unlearnable")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_protect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        action="append",
        required=True,
        dest="inputs",
        help="shards: a brace pattern, a .tar, or a folder/prefix (every *.tar under it); repeatable",
    )
    p.add_argument("--output", required=True, help="release folder or URL (s3://bucket/prefix, any fsspec URL)")
    add_generation_args(p)
    p.add_argument(
        "--max-rounds",
        type=int,
        default=config_default("max_rounds"),
        help="stop after this many rounds even if not converged",
    )
    p.add_argument("--workers", type=int, default=None, help="worker actors (default: one per GPU, else 1)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 with GPUs in the cluster, else 0")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="default: the machine's cores / workers")
    p.add_argument("--work-dir", default=None, help="noise state and checkpoints (default: <output>.work)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="labels are integers in [0, K) (class names are then rejected); default: the largest integer "
        "label seen at plan time + 1, or the number of class names",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=config_default("max_pixels"),
        help="reject larger images (decompression bombs)",
    )
    p.add_argument("--image-key", default=None, help="image member extension (default: first of png|jpg|jpeg|webp)")
    p.add_argument(
        "--label-key",
        default=config_default("label_key"),
        help="where each sample's class is: a member (cls, txt, any extension) holding an integer or a "
        "class name, or MEMBER:FIELD for a field of a JSON member (json:label, json:meta.class); "
        "class names get ids in sorted order",
    )
    p.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the noise state and checkpoints after the release (a later rerun can then repair a "
        "damaged release; they can also undo the protection: never publish them)",
    )
    p.add_argument(
        "--manifest-source-hash",
        action="store_true",
        help="add each original's sha256 to the manifest (it lets anyone confirm a guessed original)",
    )
    p.add_argument(
        "--keep-metadata",
        action="store_true",
        help="release each photo's EXIF and XMP (camera, time, GPS position) too; by default only its ICC "
        "colour profile is kept and the rest is stripped (orientation is always applied)",
    )
    p.add_argument(
        "--cache",
        choices=list(CACHE_CHOICES),
        default=config_default("cache"),
        help="where a worker keeps its share: memory (photos at native size for the stop check, working images "
        "and noise, all in memory), disk (photos written raw to the worker's local disk under TMPDIR at load and "
        "read back; working images and noise in files there too), none (photos decoded from the input again "
        "every round; working images and noise on local disk: bounded memory), auto (photos in memory up to "
        "--cache-memory-gb per worker, the rest streamed; working images and noise in memory when the share "
        "fits that budget, else on local disk). The release is the same in every mode",
    )
    p.add_argument(
        "--cache-memory-gb",
        type=float,
        default=None,
        help="--cache auto's budget per worker (default: a fifth of the node's memory)",
    )
    p.add_argument(
        "--labels",
        choices=["member", "cluster"],
        default=config_default("labels"),
        help="member: each sample's label is read (--label-key); cluster: an unlabelled corpus, grouped "
        "by k-means on its pixels into --num-classes pseudo-classes that the noise is made for",
    )
    p.add_argument(
        "--encode-format",
        choices=list(ENCODE_FORMATS),
        default=config_default("encode_format"),
        help="the released images' encoding (member .png, .jpg or .webp). jpeg and webp are lossy: the "
        "stop check, the probe and the manifest's linf then see the decoded bytes, as a victim does, "
        "and linf includes the codec's error; JPEG refuses images with alpha",
    )
    p.add_argument(
        "--encode-quality",
        type=int,
        default=None,
        help=f"jpeg or webp quality, 1-100 (default {DEFAULT_ENCODE_QUALITY})",
    )
    p.add_argument("--overwrite", action="store_true", help="discard an existing run at this output and start over")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the frozen plan (shards, samples, classes) and the work it takes; run nothing",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="with --dry-run: image-steps/s of one GPU, as `unlearnable bench` measured it, for GPU-hours",
    )


def config_default(name: str):
    """A ``ProtectConfig`` field's default: the one set of defaults, which the CLI shows and passes on."""
    return ProtectConfig.__dataclass_fields__[name].default


def add_generation_args(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    d = {
        name: config_default(name)
        for name in (
            "mode",
            "surrogate",
            "resolution",
            "pgd_steps",
            "train_steps",
            "batch_size",
            "step_size",
            "probe_steps",
        )
    }
    d.update(defaults or {})
    p.add_argument("--mode", choices=["samplewise", "classwise"], default=d["mode"])
    p.add_argument("--surrogate", default=d["surrogate"], help="model the noise is optimised against")
    p.add_argument("--resolution", type=int, default=d["resolution"], help="working resolution in pixels")
    p.add_argument("--eps", default="8/255", help="L-inf budget, a fraction or a float")
    p.add_argument("--step-size", default=d["step_size"], help="PGD step (default: eps/10)")
    p.add_argument("--pgd-steps", type=int, default=d["pgd_steps"], help="default: 20 sample-wise, 1 class-wise")
    p.add_argument(
        "--robust",
        choices=list(ROBUST_CHOICES),
        default=config_default("robust"),
        help="on: noise made to survive informed victims (REM-style min-min-max: the surrogate trains and "
        "the noise is optimised against an adversary of radius min(4/255, eps/2) and random "
        "transformations like the countermeasure battery's; each PGD step costs about 4 plain ones); "
        "off: the paper's min-min noise",
    )
    p.add_argument(
        "--robust-rho",
        default=None,
        help="--robust on's adversary radius, a fraction or a float in [0, eps] (0: transformations only); "
        "default min(4/255, eps/2)",
    )
    p.add_argument("--train-steps", type=int, default=d["train_steps"], help="surrogate SGD steps per round")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="surrogate training batch")
    p.add_argument(
        "--noise-batch-size",
        type=int,
        default=None,
        help="images per PGD batch in the noise stage and the stop check (default: --batch-size; "
        "larger often pays on a GPU: measure with `unlearnable bench --batch-size`)",
    )
    p.add_argument(
        "--stop-error",
        type=float,
        default=config_default("stop_error"),
        help="stop when the error on released data is at most this",
    )
    p.add_argument(
        "--probe-arch",
        default=config_default("probe_arch"),
        help="the protection probe's model; A,B,...: the first probes every round, and on the final release the "
        "others run the whole battery too (NAME@ARCH in the record; none with --probe-countermeasures none): the "
        "release holds only if every one does",
    )
    p.add_argument("--probe-steps", type=int, default=d["probe_steps"], help="the probe's training steps")
    p.add_argument(
        "--probe-samples",
        type=int,
        default=config_default("probe_samples"),
        help="the probe trains and scores on at most this many samples of the corpus, chosen by a hash of "
        "the key (default: one epoch of the default probe steps)",
    )
    p.add_argument(
        "--probe-threshold",
        type=float,
        default=None,
        help=f"probe accuracy that still counts as protected (default: chance + {PROBE_MARGIN} x "
        "(clean-trained probe - chance))",
    )
    p.add_argument(
        "--probe-countermeasures",
        default=config_default("probe_countermeasures"),
        help="the probe's countermeasure battery, judged on the final release: comma-separated NAME[:ARG] "
        "(none, jpeg:Q, grayscale, blur:SIGMA, bdr:BITS, cutout, cutmix, mixup, ueraser, at:EPS) or "
        "'all'; each is also early-stopped on a clean validation half, and the release is reported "
        "protected only when every one holds. 'none': the plain probe only",
    )
    p.add_argument("--seed", type=int, default=config_default("seed"))
    p.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        default=config_default("precision"),
        help="the surrogate's precision in the noise stage, training and the stop check "
        "(auto: bf16 autocast on a GPU with bf16, else fp32)",
    )
    p.add_argument(
        "--compile",
        choices=list(COMPILE_CHOICES),
        default=config_default("compile"),
        help="torch.compile the noise stage's surrogate (auto: on a GPU only; reduce-overhead adds CUDA "
        "graphs; off: eager)",
    )
    p.add_argument(
        "--skip-converged",
        action=argparse.BooleanOptionalAction,
        default=config_default("skip_converged"),
        help="sample-wise: skip this round's PGD steps for samples whose surrogate loss on their released "
        f"image is already below {CONVERGED_LOSS:.4f} (p >= 0.99)",
    )


def config_from_args(args: argparse.Namespace) -> ProtectConfig:
    names = ProtectConfig.__dataclass_fields__
    return ProtectConfig(**{k: v for k, v in vars(args).items() if k in names})


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. Given the ``command`` about to run, the ``evaluate`` and ``bench`` parsers get their arguments
    only when it is theirs: their modules import torch, which ``status``, ``verify`` and ``make-shards`` never need."""
    parser = argparse.ArgumentParser(prog="unlearnable", description=__doc__, formatter_class=_Formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "protect", help="add error-minimizing noise to a corpus and write the release", formatter_class=_Formatter
    )
    _add_protect_args(p)

    p = sub.add_parser(
        "evaluate",
        help="train a victim from scratch on shards and score it on clean test shards",
        formatter_class=_Formatter,
    )
    if command in (None, "evaluate"):
        from pipeline.evaluate import add_evaluate_args

        add_evaluate_args(p)

    p = sub.add_parser(
        "demo",
        help="bundled real data (MNIST), end to end: protect, victims, report.md + report.png",
        formatter_class=_Formatter,
    )
    p.add_argument("--output", default="demo-output")
    p.add_argument("--mode", choices=["samplewise", "classwise"], default="samplewise")
    p.add_argument(
        "--skip-converged",
        action=argparse.BooleanOptionalAction,
        default=config_default("skip_converged"),
        help="skip the PGD steps of samples the surrogate already fits (see protect --help)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs (and torch threads) of the demo's worker; unset: the machine's cores",
    )
    p.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the work dir (round records, noise state, checkpoints) after the release",
    )
    p.add_argument(
        "--probe-countermeasures",
        default=config_default("probe_countermeasures"),
        help="the probe's battery (see protect --help); the protected victims train under the same ones",
    )

    p = sub.add_parser(
        "report",
        help="report.html and its figures for a finished run, in a folder beside the release",
        formatter_class=_Formatter,
    )
    p.add_argument("output", help="the release (a finished run: it has _SUCCESS.json)")
    p.add_argument(
        "--input",
        action="append",
        default=None,
        dest="inputs",
        help="the run's input shards, as given to protect (repeatable), to show originals and noise; "
        "_SUCCESS.json does not name them",
    )
    p.add_argument(
        "--out",
        default=None,
        help="the report folder (default: <output>.report beside a local release; for a URL, "
        "./<last component>.report); never inside the release or its work dir",
    )
    p.add_argument("--samples", type=int, default=8, help="samples shown (one per label where there are labels)")

    p = sub.add_parser(
        "bench",
        help="time the noise step (engine against the paper-style fp32 baseline) and a whole round in-process",
        formatter_class=_Formatter,
    )
    if command in (None, "bench"):
        from tools.bench import add_bench_args

        add_bench_args(p)

    p = sub.add_parser(
        "status", help="rounds, stages, shards done/failed/left, last error, complete?", formatter_class=_Formatter
    )
    p.add_argument("output")
    p.add_argument("--work-dir", default=None, help="default: <output>.work")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "verify",
        help="check every shard against its marker and manifest; exit 0 only if all holds",
        formatter_class=_Formatter,
    )
    p.add_argument("output")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser(
        "make-shards",
        help="a folder of images (local or s3://bucket/prefix, walked recursively) to WebDataset shards, streamed",
        formatter_class=_Formatter,
    )
    p.add_argument("src", metavar="SRC", help="a folder or a URL (s3://bucket/prefix); hidden names are skipped")
    p.add_argument("out", metavar="OUT", help="where the shards go: a folder or a URL")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument(
        "--labels",
        choices=["folders", "none"],
        default="folders",
        help="folders: the label is the top-level sub-folder (classes.json records the ids); none: no cls member",
    )
    return parser


def _status_text(info: dict) -> str:
    lines = [f"{info['output']}: {info['state']}"]
    for key in (
        "rounds",
        "rounds_done",
        "round",
        "stage",
        "shards",
        "seconds_per_round",
        "noise_images_per_second",
        "eta_seconds_at_most",
        "stop_reason",
        "surrogate_error",
        "last_error_on_released_data",
        "protection",
        "counts",
        "last_run_error",
    ):
        value = info.get(key)
        if value is None:
            continue
        if key == "shards":
            lines.append(
                f"  shards: {value['done']}/{value['total']} done, {value['left']} left, "
                f"{value['failed']} failed to read"
            )
        else:
            lines.append(f"  {key}: {json.dumps(value, default=str)}")
    return "\n".join(lines)


SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")


def redact(text: str) -> str:
    """``text`` with the values of the AWS credential variables replaced: they never reach a log or an error."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


class _RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        return True


def _cause(exc: BaseException) -> BaseException:
    """The error a Ray task raised, rather than Ray's wrapper (whose text holds the remote traceback)."""
    return getattr(exc, "cause", None) or exc


def _one_line(exc: BaseException) -> str:
    cause = _cause(exc)
    lines = str(cause).strip().splitlines()
    text = lines[0] if lines else ""
    if not isinstance(cause, (LeaseHeld, ValueError)):  # ConfigRefused is a ValueError
        text = f"{type(cause).__name__}: {text}" if text else type(cause).__name__
    return redact(text)


def _command(argv: list[str]) -> str | None:
    """The command in ``argv``: its first word that is not an option (the only top-level option takes no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactingFilter())
    try:
        if args.command == "protect" and args.dry_run:
            from pipeline.estimate import estimate

            print(json.dumps(estimate(config_from_args(args), args.rate, args.workers), indent=2))
            return 0
        if args.command == "protect":
            from pipeline.coordinator import protect

            result = protect(config_from_args(args))
            print(
                json.dumps(
                    {
                        k: result.success[k]
                        for k in ("rounds", "stop_reason", "surrogate_error", "protection", "counts")
                    },
                    indent=2,
                )
            )
            if result.exit_code:
                p = result.success["protection"]
                broken = [
                    f"{name} {c['worst']:.3f}" for name, c in (p.get("countermeasures") or {}).items() if not c["holds"]
                ]
                if p["probe_clean_accuracy"] <= p["threshold"]:
                    why = f"the probe learns only {p['probe_clean_accuracy']:.3f} from clean data, so it cannot tell"
                elif p["probe_accuracy"] > p["threshold"]:
                    why = f"probe accuracy {p['probe_accuracy']:.3f} > threshold {p['threshold']:.3f}"
                else:
                    why = f"under {', '.join(broken)} the probe exceeds the threshold {p['threshold']:.3f}"
                print(
                    f"unlearnable: the release is complete but the protection probe does not hold ({why})",
                    file=sys.stderr,
                )
            return result.exit_code
        if args.command == "evaluate":
            from pipeline.evaluate import evaluate_cli

            return evaluate_cli(args)
        if args.command == "demo":
            from tools.demo import run_demo

            return run_demo(
                args.output,
                args.mode,
                skip_converged=args.skip_converged,
                cpus_per_worker=args.cpus_per_worker,
                keep_work=args.keep_work,
                probe_countermeasures=args.probe_countermeasures,
            )
        if args.command == "report":
            from tools.run_report import write_run_report

            print(write_run_report(args.output, args.inputs, args.out, args.samples))
            return 0
        if args.command == "bench":
            from tools.bench import bench_cli

            return bench_cli(args)
        if args.command == "status":
            from pipeline.inspection import status

            info = status(args.output, args.work_dir)
            print(json.dumps(info, indent=2, default=str) if args.json else _status_text(info))
            if info["state"] == "not started":
                # Not "incomplete": there is no run here to resume (a mistyped OUTPUT, or a --work-dir not given).
                print(
                    f"unlearnable: no run found at {info['output']} (no _SUCCESS.json, no run.json in its work dir)",
                    file=sys.stderr,
                )
                return EXIT_BAD_ARGS
            return 0 if info["complete"] else EXIT_INCOMPLETE
        if args.command == "verify":
            from pipeline.inspection import verify

            verdict = verify(args.output)
            if args.json:
                print(
                    json.dumps(
                        {
                            "ok": verdict.ok,
                            "problems": verdict.problems,
                            "bad_shards": verdict.bad_shards,
                            **verdict.summary,
                        },
                        indent=2,
                    )
                )
            else:
                print(("OK: " if verdict.ok else "FAILED: ") + json.dumps(verdict.summary))
                for problem in verdict.problems:
                    print(f"  {problem}")
            if not verdict.ok:
                print(
                    f"unlearnable: verify found {len(verdict.problems)} problem(s); first: {verdict.problems[0]}",
                    file=sys.stderr,
                )
            return 0 if verdict.ok else EXIT_VERIFY_FAILED
        if args.command == "make-shards":
            from tools.make_shards import make_shards

            written = make_shards(args.src, args.out, args.per_shard, labels=args.labels)
            print(json.dumps(written, indent=2))
            return 0
    except ValueError as exc:  # ConfigRefused among them
        print(f"unlearnable: {_one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_ARGS
    except LeaseHeld as exc:
        print(f"unlearnable: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except KeyboardInterrupt:
        print("unlearnable: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INCOMPLETE
    except Exception as exc:  # the one place that turns any failure into one line and an exit status
        log.debug("run failed", exc_info=True)  # the traceback only with --verbose
        from pipeline.storage.fs import is_permanent

        if is_permanent(_cause(exc)):
            print(
                f"unlearnable: {_one_line(exc)} (a rerun will not mend this: fix the location or its permissions)",
                file=sys.stderr,
            )
            return EXIT_BAD_ARGS
        print(f"unlearnable: incomplete ({_one_line(exc)}); rerun the same command to resume", file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_BAD_ARGS


if __name__ == "__main__":
    sys.exit(main())
