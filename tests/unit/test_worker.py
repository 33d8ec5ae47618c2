"""The worker's round code in-process (no Ray), on real MNIST shards: the stages change what they should."""

from __future__ import annotations

import io
import os

import torch

from ops.image import encode_png, release_native, to_working
from ops.noise import decode_noise, encode_noise
from pipeline.config import ProtectConfig
from pipeline.rows import RowFile
from pipeline.storage.shards import RawSample, write_tar
from pipeline.worker import RoundWorker
from surrogates.training import predict


def _random_noise(worker: RoundWorker, eps: float, generator: torch.Generator | None = None) -> None:
    """Uniform noise in [-eps, eps] on every held row, kept (quantised) as the noise stage keeps its own."""
    worker.set_noise_rows(slice(None), torch.empty(worker.noise_q.shape).uniform_(-eps, eps, generator=generator))


def _worker(mnist_small, mode: str) -> tuple[RoundWorker, list[str]]:
    train = os.path.join(mnist_small["root"], "train")
    cfg = ProtectConfig(
        inputs=[train],
        output="/unused",
        mode=mode,
        surrogate="gap-cnn",
        resolution=28,
        pgd_steps=2,
        step_size="4/255",
        train_steps=2,
        batch_size=64,
        num_classes=10,
    )
    cfg.resolved()
    worker = RoundWorker(cfg.to_dict(), 10, 1, threads=1)
    shards = sorted(n[:-4] for n in os.listdir(train) if n.endswith(".tar"))
    for shard in shards:
        worker.load_shard(shard, os.path.join(train, f"{shard}.tar"))
    return worker, shards


def test_classwise_round_moves_the_class_noise_and_the_release(mnist_small):
    worker, shards = _worker(mnist_small, "classwise")
    worker.train_stage()
    for shard in shards:
        worker.noise_stage(shard, 0)
    sums, counts = worker.class_update_sums()
    # The sums handed to the coordinator are the stage's, not the reset accumulators (same tensor on a CPU worker).
    assert counts.sum() == worker.x.shape[0] and sums.abs().sum() > 0
    assert worker.class_update_sums()[1].sum() == 0  # reset for the next stage
    worker.apply_class_update(sums, counts)
    assert worker.class_delta.abs().max() > 0
    released = worker.released_working(shards[0]).to(torch.int32)
    sd = worker.shards[shards[0]]
    assert (released - worker.x[sd.start : sd.end].to(torch.int32)).abs().sum() > 0


def test_samplewise_noise_stage_moves_background_and_stroke_pixels(mnist_small):
    worker, shards = _worker(mnist_small, "samplewise")
    worker.train_stage()
    worker.noise_stage(shards[0], 0)
    sd = worker.shards[shards[0]]
    x, d = worker.x[sd.start : sd.end], worker.noise_rows(slice(sd.start, sd.end))
    assert (d[x == 0] > 0).float().mean() > 0.1 and (d[x == 255] < 0).float().mean() > 0.1
    assert d.abs().max() <= worker.cfg.eps + 1e-6


def test_stop_check_on_photos_of_mixed_sizes_is_the_per_image_release(tmp_path):
    """Natives of several sizes and channel counts: the stop check's released images (computed a size group at a
    time) are exactly what the export's per-image release, resized to the working resolution, gives a victim."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 40, 52), (1, 40, 52), (3, 40, 52), (3, 17, 70), (1, 33, 33), (3, 40, 52), (3, 32, 32)] * 3
    samples = []
    for i, shape in enumerate(shapes):
        image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        samples.append(RawSample(f"img-{i:03d}", {"png": encode_png(image), "cls": str(i % 10).encode()}))
    (tmp_path / "photos-000000.tar").write_bytes(write_tar(samples))
    cfg = ProtectConfig(
        inputs=[str(tmp_path)], output="/unused", surrogate="small-cnn", resolution=32, batch_size=8, num_classes=10
    ).resolved()
    worker = RoundWorker(cfg.to_dict(), 10, 3, threads=1)
    worker.load_shard("photos-000000", str(tmp_path / "photos-000000.tar"))
    sd = worker.shards["photos-000000"]
    assert not sd.native_is_working and len(sd.keys) == len(shapes)
    _random_noise(worker, cfg.eps, g)
    released = worker.released_working("photos-000000")
    expected = torch.stack(
        [to_working(release_native(nat.color, worker.noise_rows(i)), 32, 3) for i, nat in enumerate(sd.natives)]
    )
    assert torch.equal(released, expected)
    assert (released.to(torch.int32) - worker.x.to(torch.int32)).abs().sum() > 0  # the noise is in it
    # The stop check counts the surrogate's errors on exactly those images.
    wrong = int((predict(worker.model, expected.float() / 255.0) != worker.y).sum())
    check = worker.released_error()
    assert (check["wrong"], check["total"]) == (wrong, len(shapes))


def test_noise_stage_cuts_batches_of_the_noise_batch_size(mnist_small, monkeypatch):
    train = os.path.join(mnist_small["root"], "train")
    cfg = ProtectConfig(
        inputs=[train],
        output="/unused",
        surrogate="gap-cnn",
        resolution=28,
        pgd_steps=1,
        train_steps=1,
        batch_size=16,
        noise_batch_size=48,
        num_classes=10,
    ).resolved()
    assert ProtectConfig(inputs=[train], output="/u", batch_size=16).resolved().noise_batch_size == 16  # default
    worker = RoundWorker(cfg.to_dict(), 10, 1, threads=1)
    shard = min(n[:-4] for n in os.listdir(train) if n.endswith(".tar"))
    worker.load_shard(shard, os.path.join(train, f"{shard}.tar"))
    seen: list[int] = []
    minimize = worker.engine.minimize
    monkeypatch.setattr(worker.engine, "minimize", lambda x, *a, **k: seen.append(x.shape[0]) or minimize(x, *a, **k))
    worker.noise_stage(shard, 0)
    n = worker.x.shape[0]
    assert seen == [48] * (n // 48) + ([n % 48] if n % 48 else [])
    train_batches: list[int] = []
    monkeypatch.setattr(
        worker.model, "forward", lambda x, f=worker.model.forward: train_batches.append(x.shape[0]) or f(x)
    )
    worker.train_stage()
    assert train_batches == [16]  # the training batch is still --batch-size


def test_train_stage_runs_in_the_engines_precision(mnist_small):
    """--precision bf16: the train stage's forward runs under bf16 autocast, the weights stay fp32 and learn."""
    train = os.path.join(mnist_small["root"], "train")
    cfg = ProtectConfig(
        inputs=[train],
        output="/unused",
        surrogate="small-cnn",
        resolution=28,
        train_steps=3,
        batch_size=64,
        num_classes=10,
        precision="bf16",
    ).resolved()
    worker = RoundWorker(cfg.to_dict(), 10, 1, threads=1)
    shard = min(n[:-4] for n in os.listdir(train) if n.endswith(".tar"))
    worker.load_shard(shard, os.path.join(train, f"{shard}.tar"))
    dtypes: list[torch.dtype] = []
    first_conv = next(m for m in worker.model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = [p.detach().clone() for p in worker.model.parameters()]
    out = worker.train_stage(0)
    assert dtypes == [torch.bfloat16] * 3
    assert all(p.dtype == torch.float32 for p in worker.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, worker.model.parameters()))
    assert 0 < out["loss"] < 10


def _robust_worker(mnist_small, robust: str) -> tuple[RoundWorker, list[str]]:
    train = os.path.join(mnist_small["root"], "train")
    cfg = ProtectConfig(
        inputs=[train],
        output="/unused",
        surrogate="small-cnn",
        resolution=28,
        pgd_steps=2,
        step_size="4/255",
        train_steps=2,
        batch_size=64,
        num_classes=10,
        robust=robust,
    )
    cfg.resolved()
    worker = RoundWorker(cfg.to_dict(), 10, 1, threads=1)
    shards = sorted(n[:-4] for n in os.listdir(train) if n.endswith(".tar"))[:1]
    worker.load_shard(shards[0], os.path.join(train, f"{shards[0]}.tar"))
    return worker, shards


def test_robust_on_trains_against_the_adversary_and_its_noise_depends_only_on_round_and_shard(mnist_small):
    """--robust on reaches both stages: the train stage trains on attacked batches (same weights and batches as
    --robust off, another loss), and the noise stage's min-min-max gives other noise than the plain update, within
    eps, the same however often the unit is computed (a resumed stage, a guest worker)."""
    plain, shards = _robust_worker(mnist_small, "off")
    robust, _ = _robust_worker(mnist_small, "on")
    assert plain.adversary is None and robust.adversary is not None and robust.engine.robust is not None
    assert plain.train_stage(0)["loss"] != robust.train_stage(0)["loss"]
    robust.noise_stage(shards[0], 0)
    sd = robust.shards[shards[0]]
    rows = slice(sd.start, sd.end)
    first = robust.noise_rows(rows).clone()
    assert 0 < first.abs().max() <= robust.cfg.eps + 1e-6
    robust.noise_q[rows] = 0
    robust.noise_stage(shards[0], 0)
    assert torch.equal(robust.noise_rows(rows), first)
    plain.model.load_state_dict(robust.model.state_dict())  # the same surrogate, both from zero noise
    plain.noise_stage(shards[0], 0)
    assert not torch.equal(plain.noise_rows(rows), first)


def test_the_export_keeps_the_icc_profile_and_releases_exif_and_xmp_only_when_asked(tmp_path):
    """Camera JPEGs with an orientation, a GPS position, XMP and an ICC profile through the export: released upright
    with the profile; EXIF and XMP (orientation removed) only with --keep-metadata."""
    import io

    import numpy as np
    from PIL import Image, ImageCms

    from pipeline.storage.shards import iter_samples

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    samples = []
    for i in range(4):
        arr = np.full((10, 20, 3), 30 * i, dtype=np.uint8)
        arr[:, :10] = (255, 0, 0)
        exif = Image.Exif()
        exif[0x0112] = 6
        exif[0x8825] = {1: "N", 2: (48.0, 51.0, float(i))}
        buf = io.BytesIO()
        Image.fromarray(arr).save(
            buf,
            format="JPEG",
            exif=exif,
            icc_profile=icc,
            xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><r tiff:Orientation="6"/></x:xmpmeta>',
        )
        samples.append(RawSample(f"cam-{i}", {"jpg": buf.getvalue(), "cls": str(i).encode()}))
    (tmp_path / "in").mkdir()
    url = str(tmp_path / "in" / "cam-000000.tar")
    (tmp_path / "in" / "cam-000000.tar").write_bytes(write_tar(samples))
    for keep, fmt in ((False, "png"), (True, "png"), (False, "jpeg"), (True, "jpeg"), (False, "webp")):
        out = tmp_path / f"out-{keep}-{fmt}"
        cfg = ProtectConfig(
            inputs=[str(tmp_path / "in")],
            output=str(out),
            resolution=16,
            num_classes=10,
            keep_metadata=keep,
            encode_format=fmt,
        ).resolved()
        worker = RoundWorker(cfg.to_dict(), 10, 3, threads=1)
        worker.load_shard("cam-000000", url)
        assert all(n.exif is None and n.icc is None for n in worker.shards["cam-000000"].natives)  # pixels only
        worker.export_shard("cam-000000", str(out), str(tmp_path / f"work-{keep}-{fmt}"), "0" * 64)
        released = list(iter_samples(str(out / "cam-000000.tar")))
        assert [s.key for s in released] == [s.key for s in samples]
        for sample in released:
            img = Image.open(io.BytesIO(sample.members[{"jpeg": "jpg"}.get(fmt, fmt)]))
            assert img.format == fmt.upper()
            assert img.size == (10, 20) and img.getpixel((2, 2))[0] > 200  # upright: the red half on top
            assert img.info.get("icc_profile") == icc
            exif = img.getexif()
            xmp = img.info.get("XML:com.adobe.xmp") or img.info.get("xmp") or b""
            xmp = xmp.decode() if isinstance(xmp, bytes) else xmp
            if keep:
                assert exif.get_ifd(0x8825)[1] == "N" and 0x0112 not in exif
                assert "xmpmeta" in xmp and "Orientation" not in xmp
            else:
                assert len(exif) == 0 and not xmp


def test_a_lossy_release_is_judged_on_the_decoded_bytes_it_releases(tmp_path):
    """--encode-format jpeg and webp: the stop check's (and the probe's) released images are exactly the pixels a
    victim decodes from the release's bytes, resized to the working resolution; the manifest's linf, l2 and psnr
    are measured on those decoded pixels (so they include the codec's error); an RGBA image is rejected by a JPEG
    run at the load, with the reason, and released with its alpha untouched by a WebP run."""
    import io

    import numpy as np
    from PIL import Image

    from ops import metrics
    from ops.image import decode_image, match_channels
    from pipeline.storage import manifest
    from pipeline.storage.shards import iter_samples

    g = torch.Generator().manual_seed(5)
    shapes = [(3, 40, 52), (1, 40, 52), (3, 17, 70), (3, 32, 32), (1, 32, 32), (3, 24, 24)] * 2
    samples = []
    for i, shape in enumerate(shapes):
        image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        samples.append(
            RawSample(
                f"img-{i:03d}", {"png": encode_png(image), "cls": str(i % 10).encode(), "txt": f"caption {i}".encode()}
            )
        )
    rgba = np.concatenate(
        [np.full((20, 20, 3), 90, np.uint8), np.tile(np.arange(20, dtype=np.uint8)[:, None] * 12, (1, 20))[..., None]],
        axis=2,
    )
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    samples.append(RawSample("with-alpha", {"png": buf.getvalue(), "cls": b"3"}))
    (tmp_path / "in").mkdir()
    url = str(tmp_path / "in" / "photos-000000.tar")
    (tmp_path / "in" / "photos-000000.tar").write_bytes(write_tar(samples))
    originals = {s.key: decode_image(s.members["png"]) for s in samples}
    for fmt, ext, quality in (("jpeg", "jpg", 85), ("webp", "webp", None)):
        out = tmp_path / f"out-{fmt}"
        cfg = ProtectConfig(
            inputs=[str(tmp_path / "in")],
            output=str(out),
            resolution=32,
            batch_size=8,
            num_classes=10,
            encode_format=fmt,
            encode_quality=quality,
        ).resolved()
        assert cfg.encode_quality == (quality or 90)
        worker = RoundWorker(cfg.to_dict(), 10, 3, threads=1)
        worker.load_shard("photos-000000", url)
        sd = worker.shards["photos-000000"]
        assert ("with-alpha" in sd.keys) == (fmt == "webp")
        _random_noise(worker, cfg.eps, g)
        checked = worker.released_working("photos-000000")
        worker.export_shard("photos-000000", str(out), str(tmp_path / f"work-{fmt}"), "0" * 64)
        released = {s.key: s for s in iter_samples(str(out / "photos-000000.tar"))}
        assert list(released) == sd.keys
        rows = {r["key"]: r for r in manifest.from_parquet((out / "photos-000000.parquet").read_bytes()).to_pylist()}
        if fmt == "jpeg":
            assert rows["with-alpha"]["status"] == "rejected" and "alpha" in rows["with-alpha"]["error"]
        codec_error = False
        for i, key in enumerate(sd.keys):
            sample = released[key]
            assert set(sample.members) == {ext, "cls"} | ({"txt"} if key != "with-alpha" else set())
            data = sample.members[ext]
            assert Image.open(io.BytesIO(data)).format == fmt.upper()
            original = originals[key]
            victim = decode_image(data)
            pixels = match_channels(victim.color, original.color.shape[0])
            # The stop check's row is what a victim decodes from these bytes, at the working resolution.
            assert torch.equal(checked[i], to_working(pixels, 32, 3)), key
            row = rows[key]
            assert row["output_member"] == f"{key}.{ext}"
            assert row["linf"] == metrics.linf(pixels, original.color)
            assert row["psnr"] == metrics.psnr(pixels, original.color)
            codec_error |= row["linf"] > round(cfg.eps * 255)
            if key == "with-alpha":
                assert torch.equal(victim.alpha, original.alpha)
        assert codec_error  # the codec's error shows in linf: it is not the noise's bound
        check = worker.released_error()
        wrong = int((predict(worker.model, checked.float() / 255.0) != worker.y).sum())
        assert (check["wrong"], check["total"]) == (wrong, len(sd.keys))


def test_the_stop_check_and_the_release_are_the_same_in_every_cache_mode(tmp_path):
    """--cache memory keeps the photos at native size, disk writes them raw to local disk and reads them back, none
    decodes them from the input again for every stop check, auto keeps them up to its budget (here: the first shard
    only) and streams the rest; PNG and JPEG releases. The stop check's images and the released bytes are identical
    in every mode."""
    from pipeline.storage.shards import iter_samples

    g = torch.Generator().manual_seed(11)
    shapes = [(3, 40, 52), (1, 40, 52), (3, 17, 70), (3, 40, 52), (1, 33, 33), (3, 32, 32)] * 4
    (tmp_path / "in").mkdir()
    shards = []
    for s in range(2):
        samples = []
        for i, shape in enumerate(shapes):
            image = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
            samples.append(RawSample(f"s{s}-{i:03d}", {"png": encode_png(image), "cls": str(i % 10).encode()}))
        (tmp_path / "in" / f"photos-{s:06d}.tar").write_bytes(write_tar(samples))
        shards.append((f"photos-{s:06d}", str(tmp_path / "in" / f"photos-{s:06d}.tar")))
    noise = torch.empty(2 * len(shapes), 3, 32, 32).uniform_(-8 / 255, 8 / 255, generator=g)
    for fmt in ("png", "jpeg"):
        seen = {}
        for cache, budget in (("memory", None), ("disk", None), ("none", None), ("auto", 1e-4)):
            cfg = ProtectConfig(
                inputs=[str(tmp_path / "in")],
                output="/unused",
                resolution=32,
                num_classes=10,
                batch_size=8,
                encode_format=fmt,
                cache=cache,
                cache_memory_gb=budget,
            ).resolved()
            worker = RoundWorker(cfg.to_dict(), 10, 3, threads=1)
            worker.load_shards(shards)
            kept = [type(worker.shards[s].natives).__name__ for s, _ in shards]
            assert (
                kept
                == {
                    "memory": ["list", "list"],
                    "disk": ["DiskShard", "DiskShard"],
                    "none": ["NoneType", "NoneType"],
                    "auto": ["list", "NoneType"],
                }[cache]
            ), cache
            worker.set_noise_rows(slice(None), noise)
            checked = torch.cat([worker.released_working(s) for s, _ in shards])
            out = tmp_path / f"out-{fmt}-{cache}"
            for s, _ in shards:
                worker.export_shard(s, str(out), str(tmp_path / f"work-{fmt}-{cache}"), "0" * 64)
            released = [(x.key, x.members) for s, _ in shards for x in iter_samples(str(out / f"{s}.tar"))]
            seen[cache] = (checked, released, (out / "photos-000001.parquet").read_bytes())
            assert (checked.to(torch.int32) - worker.x[:].to(torch.int32)).abs().sum() > 0
            # The working images and noise levels: in memory, or in unnamed files on local disk (pipeline.rows); auto's
            # budget here (100 KB) is under the share's 295 KB of them.
            on_disk = cache != "memory"
            assert isinstance(worker.x, RowFile) == on_disk and isinstance(worker.noise_q, RowFile) == on_disk
            assert torch.equal(worker.noise_q[:], encode_noise(noise, cfg.eps)) and worker.x.shape[0] == len(noise)
            if on_disk:  # no name: nothing left by a kill
                assert os.fstat(worker.x.file.fileno()).st_nlink == 0 == os.fstat(worker.noise_q.file.fileno()).st_nlink
            if cache == "disk":  # the raw pixels in the worker's one unnamed temporary file
                assert worker.disk_cache.bytes == sum(
                    image.color.numel() for s, _ in shards for image in worker.shards[s].natives
                )
                assert os.fstat(worker.disk_cache.file.fileno()).st_nlink == 0  # no name: nothing left by a kill
        for cache in ("disk", "none", "auto"):
            assert torch.equal(seen[cache][0], seen["memory"][0]), (fmt, cache)
            assert seen[cache][1] == seen["memory"][1] and seen[cache][2] == seen["memory"][2], (fmt, cache)


def test_probe_data_is_the_probe_sample_of_each_shard_released_and_clean(mnist_small):
    from pipeline.probe import probe_sample

    worker, shards = _worker(mnist_small, "samplewise")
    _random_noise(worker, 8 / 255)
    whole = worker.probe_data()
    assert whole["keys"] == [k for s in shards for k in worker.shards[s].keys] and len(whole["keys"]) == 300
    part = worker.probe_data(0.4)
    chosen = probe_sample(whole["keys"], 0.4)
    assert part["keys"] == [k for k, c in zip(whole["keys"], chosen.tolist()) if c] and 80 < len(part["keys"]) < 160
    for name in ("released", "clean", "labels"):
        assert torch.equal(part[name], whole[name][chosen]), name
    assert part["shards"] == [(s, int(probe_sample(worker.shards[s].keys, 0.4).sum())) for s in shards]
    assert torch.equal(whole["released"], torch.cat([worker.released_working(s) for s in shards]))


def test_the_noise_is_held_as_the_int8_levels_of_its_state_and_survives_a_round_trip(mnist_small):
    """Sample-wise noise is held as int8 levels (a quarter of float32's memory): the rows every stage reads are the
    decoded levels, a shard's state is exactly its rows' levels (a compact copy, not the whole worker's storage), and
    loading it back gives the same noise."""
    worker, shards = _worker(mnist_small, "samplewise")
    worker.train_stage()
    worker.noise_stage(shards[0], 0)
    sd = worker.shards[shards[0]]
    rows = slice(sd.start, sd.end)
    assert worker.noise_q.dtype == torch.int8 and worker.noise_q.shape == worker.x.shape
    assert torch.equal(worker.noise_rows(rows), decode_noise(worker.noise_q[rows], worker.cfg.eps))
    state = worker.noise_state(shards[0])
    q = torch.load(io.BytesIO(state), weights_only=True)["q"]
    assert torch.equal(q, worker.noise_q[rows]) and q.untyped_storage().nbytes() == q.numel()
    before = worker.noise_rows(rows).clone()
    worker.noise_q[rows] = 0
    worker.load_noise_state(shards[0], state)
    assert torch.equal(worker.noise_rows(rows), before) and before.abs().max() > 0
