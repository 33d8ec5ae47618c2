"""The run's configuration: one typed dataclass, resolved once, hashed, echoed into the run record."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from ops.choices import (
    COMPILE_CHOICES,
    DEFAULT_ENCODE_QUALITY,
    DEFAULT_MAX_PIXELS,
    ENCODE_FORMATS,
    LOSSY_FORMATS,
    PRECISIONS,
    parse_fraction,
    robust_choice,
)

# Chosen from measurements on MNIST-5k (README, "Defaults"): a weak surrogate makes a strong shortcut.
DEFAULT_SURROGATE = "small-cnn"
# The probe of every round uses a different architecture from the surrogate: a probe of the surrogate's own
# architecture shares its blind spots (on MNIST-5k a small-CNN probe scored 9% where a ResNet-18 victim reached 61.5%).
# One model alone is fooled the other way too: on a --robust on release of MNIST-5k the resnet-mini probe read 17.7%
# and small-cnn victims 58%, a small-cnn probe 52.1% (docs/efficacy.md). So small-cnn probes the final release beside
# it, under the whole battery; it is the cheaper of the two (6 s against 51 s on those 4,000 digits).
DEFAULT_PROBE_ARCH = "resnet-mini,small-cnn"
DEFAULT_PROBE_STEPS = 200
# The probe trains and scores on at most this many samples, chosen by a hash of the key (pipeline.probe.probe_sample):
# 80% of them train, DEFAULT_PROBE_STEPS batches of 128 are 25,600 images, so 32,000 samples are one epoch of the
# probe's steps. More would not be seen within the steps (the probe trains at least one whole epoch, so its cost
# grew with the corpus), and a million photos at 32 px (released and clean) would be 6 GB on one worker. 6,400
# held-out samples score it within about half a point (binomial standard error).
DEFAULT_PROBE_SAMPLES = 32_000
# The probe holds when its clean accuracy is at most chance + PROBE_MARGIN * (clean-trained probe - chance),
# unless --probe-threshold gives an absolute accuracy.
PROBE_MARGIN = 0.25
# The probe's countermeasure battery, judged on the final release (ops.countermeasures): the training-time
# countermeasures that broke plain min-min noise on the demo's release (mixup 60%, adversarial training at 4/255 96%
# against 17.5% plain), each also early-stopped on a clean validation half. "none": the plain probe only.
DEFAULT_PROBE_COUNTERMEASURES = "mixup,at:4/255"
# Skip the PGD steps of samples the surrogate already fits on their released image (ops.choices.CONVERGED_LOSS).
# Measured on the MNIST demo with and without it (docs/benchmarks.md, "Skipping converged samples").
SKIP_CONVERGED_DEFAULT = False

# Fields that change results: they form the config hash that binds markers to the run. Workers, addresses,
# timeouts and --max-rounds are deliberately absent (raising --max-rounds continues a run).
HASH_FIELDS = (
    "mode",
    "surrogate",
    "resolution",
    "eps",
    "step_size",
    "pgd_steps",
    "train_steps",
    "batch_size",
    "noise_batch_size",
    "stop_error",
    "probe_arch",
    "probe_steps",
    "probe_threshold",
    "seed",
    "num_classes",
    "max_pixels",
    "image_key",
    "label_key",
    "precision",
    "compile",
    "skip_converged",
    "manifest_source_hash",
    "probe_countermeasures",
    "robust",
    "robust_rho",
    "keep_metadata",
    "encode_format",
    "encode_quality",
    "labels",
    "probe_samples",
)
# Hashed fields added later, with the value that does what runs did before them: hashed only when set otherwise.
ADDED_FIELDS = {
    "robust": "off",
    "robust_rho": None,
    "keep_metadata": False,
    "encode_format": "png",
    "encode_quality": None,
    "labels": "member",
    "probe_samples": DEFAULT_PROBE_SAMPLES,
}
CACHE_CHOICES = ("auto", "memory", "disk", "none")
# The smallest working resolution: the CNN surrogates' pooling fails below 4 px, and below 8 px no image is left.
MIN_RESOLUTION = 8


@dataclass
class ProtectConfig:
    inputs: list[str]
    output: str
    mode: str = "samplewise"
    surrogate: str = DEFAULT_SURROGATE
    resolution: int = 32
    eps: float = 8 / 255
    step_size: float | None = None  # default eps / 10
    pgd_steps: int | None = None  # default 20 (sample-wise), 1 (class-wise)
    # "on": REM-style min-min-max noise with an expectation over the battery's transformations (ops.robust), against
    # informed victims; "off": the paper's min-min noise.
    robust: str = "off"
    # --robust on's adversary radius (ops.robust); None: min(4/255, eps / 2).
    robust_rho: float | None = None
    train_steps: int = 10
    batch_size: int = 512
    # Images per PGD batch in the noise stage (and the stop check): default the training batch. The noise stage runs
    # the surrogate in eval mode, so the batch changes speed, not the algorithm; bigger pays on a GPU (bench).
    noise_batch_size: int | None = None
    stop_error: float = 0.01
    probe_arch: str = DEFAULT_PROBE_ARCH
    probe_steps: int = DEFAULT_PROBE_STEPS
    probe_samples: int = DEFAULT_PROBE_SAMPLES  # the probe's sample of the corpus, by key hash
    probe_threshold: float | None = None  # default: relative to chance and the clean-trained probe
    probe_countermeasures: str = DEFAULT_PROBE_COUNTERMEASURES  # comma-separated NAME[:ARG], or "none"
    max_rounds: int = 30
    seed: int = 0
    workers: int | None = None
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    work_dir: str | None = None
    ray_address: str | None = None
    num_classes: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_key: str | None = None
    label_key: str = "cls"
    # "member": each sample's label is read (--label-key); "cluster": an unlabelled corpus, grouped by k-means into
    # --num-classes pseudo-classes (pipeline.clusters).
    labels: str = "member"
    # Filled from the plan, like num_classes: the sorted class names when labels are names (a label's id is its
    # position; echoed in _SUCCESS.json so the manifest's ids can be read), None for integer labels. Not hashed on
    # its own: the plan's digest holds it.
    label_names: list[str] | None = None
    precision: str = "auto"  # the noise stage's surrogate: auto = bf16 autocast on a CUDA GPU with bf16, else fp32
    compile: str = "auto"  # the noise stage's surrogate: auto = torch.compile on a CUDA GPU, eager elsewhere
    skip_converged: bool = SKIP_CONVERGED_DEFAULT
    manifest_source_hash: bool = False  # a public sha256 of every original in the manifest (off: see manifest.py)
    keep_metadata: bool = False  # release EXIF and XMP (GPS, camera, time) beside the ICC profile; off: ICC only
    # The release's image encoding. JPEG and WebP are lossy: the stop check, the probe and the manifest's linf then
    # measure the decoded bytes, as a victim gets them (ops.image.encoded_roundtrip).
    encode_format: str = "png"
    encode_quality: int | None = None  # jpeg and webp only; default ops.choices.DEFAULT_ENCODE_QUALITY
    keep_work: bool = False
    overwrite: bool = False
    # Where the stop check finds the photos at native size (not hashed: the release is the same in every mode):
    # memory: kept from the load; disk: written raw to the worker's local disk at load (pipeline.native_cache) and
    # read back each round; none: decoded from the input again each round; auto: memory up to
    # cache_memory_gb (default a fifth of the node's memory) per worker, the shards beyond it streamed. The working
    # images and noise levels stay in memory with memory, go to a file on local disk (pipeline.rows) with disk and
    # none, and with auto when a worker's share of them would be over the same budget.
    cache: str = "auto"
    cache_memory_gb: float | None = None

    def resolved(self) -> ProtectConfig:
        """Fill the defaults that depend on other fields and validate; raises ValueError naming the bad field."""
        if self.mode not in ("samplewise", "classwise"):
            raise ValueError(f"--mode must be samplewise or classwise, not {self.mode!r}")
        self.eps = parse_fraction(self.eps)
        if not 0 < self.eps <= 1:
            raise ValueError(f"--eps must be in (0, 1], got {self.eps}")
        self.step_size = self.eps / 10 if self.step_size is None else parse_fraction(self.step_size)
        if not 0 < self.step_size <= self.eps:
            raise ValueError(f"--step-size must be in (0, eps], got {self.step_size}")
        self.robust = robust_choice(self.robust)  # raises ValueError for a value other than off / on
        if self.robust_rho is not None:
            self.robust_rho = parse_fraction(self.robust_rho)
            if self.robust != "on":
                raise ValueError("--robust-rho applies to --robust on only")
            if not 0 <= self.robust_rho <= self.eps:
                raise ValueError(f"--robust-rho must be in [0, eps], got {self.robust_rho}")
        self.encode_format = str(self.encode_format).strip().lower()
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"--encode-format must be one of {', '.join(ENCODE_FORMATS)}, not {self.encode_format!r}")
        if self.encode_format not in LOSSY_FORMATS:
            if self.encode_quality is not None:
                raise ValueError("--encode-quality applies to --encode-format jpeg or webp only (PNG is lossless)")
        elif self.encode_quality is None:
            self.encode_quality = DEFAULT_ENCODE_QUALITY
        elif not 1 <= int(self.encode_quality) <= 100:
            raise ValueError(f"--encode-quality must be in [1, 100], got {self.encode_quality}")
        if self.cache not in CACHE_CHOICES:
            raise ValueError(f"--cache must be one of {', '.join(CACHE_CHOICES)}, not {self.cache!r}")
        if self.cache_memory_gb is not None and not self.cache_memory_gb >= 0:
            raise ValueError(f"--cache-memory-gb must be at least 0, got {self.cache_memory_gb}")
        if self.labels not in ("member", "cluster"):
            raise ValueError(f"--labels must be member or cluster, not {self.labels!r}")
        if self.labels == "cluster" and self.num_classes is None:
            raise ValueError("--labels cluster needs --num-classes K: the number of groups to form")
        if self.pgd_steps is None:
            self.pgd_steps = 20 if self.mode == "samplewise" else 1
        if self.noise_batch_size is None:
            self.noise_batch_size = self.batch_size
        for name in (
            "resolution",
            "pgd_steps",
            "train_steps",
            "batch_size",
            "noise_batch_size",
            "max_rounds",
            "probe_steps",
        ):
            if getattr(self, name) < (0 if name == "train_steps" else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.resolution < MIN_RESOLUTION:
            raise ValueError(f"--resolution must be at least {MIN_RESOLUTION} pixels, got {self.resolution}")
        if not 0 <= self.stop_error <= 1:
            raise ValueError(f"--stop-error must be in [0, 1], got {self.stop_error}")
        for name in ("workers", "gpus_per_worker", "cpus_per_worker"):
            value = getattr(self, name)
            if value is not None and (value < 0 or (value == 0 and name != "gpus_per_worker")):
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.probe_samples < 10:
            raise ValueError(f"--probe-samples must be at least 10, got {self.probe_samples}")
        if self.probe_threshold is not None and not 0 <= self.probe_threshold <= 1:
            raise ValueError(f"--probe-threshold must be an accuracy in [0, 1], got {self.probe_threshold}")
        self.probe_countermeasures = ",".join(probe_battery(self.probe_countermeasures)) or "none"
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, not {self.compile!r}")
        if not self.inputs:
            raise ValueError("at least one --input is required")
        from pipeline.storage.fs import check_no_credentials

        for flag, url in [("--input", u) for u in self.inputs] + [
            ("--output", self.output),
            ("--work-dir", self.work_dir or ""),
        ]:
            check_no_credentials(url, flag)
        from surrogates import available

        archs = probe_archs(self.probe_arch)
        self.probe_arch = ",".join(archs)
        for name in (self.surrogate, *archs):
            if name not in available():
                raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(available()))}")
        return self

    def hashed_fields(self) -> dict:
        """The fields of the run's identity. A field added after runs existed enters it only when it changes what
        those runs did (``ADDED_FIELDS``), so that a run started by an earlier version resumes under this one."""
        return {
            name: getattr(self, name)
            for name in HASH_FIELDS
            if not (name in ADDED_FIELDS and getattr(self, name) == ADDED_FIELDS[name])
        }

    def to_dict(self) -> dict:
        return asdict(self)


def probe_battery(text: str) -> list[str]:
    """The probe's countermeasures as canonical ``NAME:ARG`` texts; [] for "none" (the plain probe only). The plain
    probe always runs (the stop rule needs it): a ``none`` in a list adds its early-stopped score to the battery."""
    from ops.countermeasures import parse_battery

    if text.strip().lower() == "none":
        return []
    return [cm.text for cm in parse_battery([text])]


def probe_archs(text: str) -> list[str]:
    """``--probe-arch``'s models, first the one the plain probe of every round trains, then those that probe the final
    release beside it, each under the whole battery (``A,B``; repeats dropped)."""
    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise ValueError("--probe-arch names no model")
    return list(dict.fromkeys(names))


def config_hash(cfg: ProtectConfig, plan_digest: str) -> str:
    """Hash of the fields that change results plus the frozen input plan."""
    payload = json.dumps({**cfg.hashed_fields(), "plan": plan_digest}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def differing_fields(recorded: dict, current: dict) -> list[str]:
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))


def field_names() -> list[str]:
    return [f.name for f in fields(ProtectConfig)]
