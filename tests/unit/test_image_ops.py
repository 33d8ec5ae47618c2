"""Unit tests for ops/image.py: decoding every Pillow mode we meet, resizing, applying noise at native size, PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ops.image import (
    DecodedImage,
    ImageRejected,
    decode_image,
    encode_png,
    match_channels,
    release_native,
    release_native_batch,
    resize_noise,
    resize_uint8,
    to_gray,
    to_working,
)
from ops.metrics import linf

EPS = 8 / 255


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------- decode_image


def test_decode_grayscale_png_gives_one_channel_exactly():
    arr = _rng().integers(0, 256, (7, 11), dtype=np.uint8)
    dec = decode_image(_png(Image.fromarray(arr, mode="L")))
    assert isinstance(dec, DecodedImage)
    assert dec.color.dtype == torch.uint8
    assert dec.color.shape == (1, 7, 11)
    assert (dec.height, dec.width) == (7, 11)
    assert dec.alpha is None
    assert np.array_equal(dec.color[0].numpy(), arr)


def test_decode_rgb_png_gives_three_channels_exactly():
    arr = _rng(1).integers(0, 256, (5, 9, 3), dtype=np.uint8)
    dec = decode_image(_png(Image.fromarray(arr, mode="RGB")))
    assert dec.color.shape == (3, 5, 9)
    assert dec.color.dtype == torch.uint8
    assert dec.alpha is None
    assert np.array_equal(dec.color.permute(1, 2, 0).numpy(), arr)


def test_decode_rgba_png_keeps_alpha_exactly():
    arr = _rng(2).integers(0, 256, (6, 4, 4), dtype=np.uint8)
    arr[0, 0, 3] = 0
    arr[0, 1, 3] = 255
    dec = decode_image(_png(Image.fromarray(arr, mode="RGBA")))
    assert dec.color.shape == (3, 6, 4)
    assert dec.alpha is not None
    assert dec.alpha.dtype == torch.uint8
    assert dec.alpha.shape == (6, 4)
    assert np.array_equal(dec.alpha.numpy(), arr[..., 3])
    # Color is not premultiplied or otherwise touched by alpha.
    assert np.array_equal(dec.color.permute(1, 2, 0).numpy(), arr[..., :3])


def test_decode_la_png_keeps_gray_and_alpha():
    arr = _rng(3).integers(0, 256, (5, 8, 2), dtype=np.uint8)
    dec = decode_image(_png(Image.fromarray(arr, mode="LA")))
    assert dec.color.shape == (1, 5, 8)
    assert np.array_equal(dec.color[0].numpy(), arr[..., 0])
    assert dec.alpha is not None
    assert np.array_equal(dec.alpha.numpy(), arr[..., 1])


def test_decode_palette_png_becomes_three_channels():
    rgb = Image.fromarray(_rng(4).integers(0, 256, (8, 10, 3), dtype=np.uint8), mode="RGB")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = _png(pal)
    assert Image.open(io.BytesIO(data)).mode == "P"
    dec = decode_image(data)
    assert dec.color.shape == (3, 8, 10)
    assert dec.alpha is None
    assert np.array_equal(dec.color.permute(1, 2, 0).numpy(), np.array(pal.convert("RGB")))


def test_decode_palette_png_with_transparency_gives_alpha():
    pal = Image.new("P", (4, 3), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    pal.putpixel((1, 1), 1)
    data = _png(pal, transparency=0)
    dec = decode_image(data)
    assert dec.color.shape == (3, 3, 4)
    assert dec.alpha is not None
    expected_alpha = np.zeros((3, 4), dtype=np.uint8)
    expected_alpha[1, 1] = 255
    assert np.array_equal(dec.alpha.numpy(), expected_alpha)
    assert dec.color[:, 1, 1].tolist() == [0, 255, 0]


def test_decode_cmyk_jpeg_becomes_three_channels():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red
    data = _jpeg(cmyk)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    dec = decode_image(data)
    assert dec.color.shape == (3, 8, 16)
    assert dec.color.dtype == torch.uint8
    assert dec.alpha is None
    r, g, b = (int(c) for c in dec.color.to(torch.int32).float().mean((1, 2)).round())
    assert r > 200 and g < 60 and b < 60


def test_decode_16bit_grayscale_scales_to_8_bits_not_clips():
    arr = np.array([[0, 65535, 32896], [1000, 257, 65280]], dtype=np.uint16)
    data = _png(Image.fromarray(arr))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    dec = decode_image(data)
    assert dec.color.dtype == torch.uint8
    assert dec.color.shape == (1, 2, 3)
    assert dec.alpha is None
    values = dec.color[0].tolist()
    assert values[0][0] == 0
    assert values[0][1] == 255
    assert abs(values[0][2] - 128) <= 1
    assert values[1][0] == 4  # 1000 / 257 ~ 3.9, not clipped to 255
    assert values[1][1] == 1
    assert values[1][2] == 254


def test_decode_dark_16bit_grayscale_is_still_scaled():
    # All values <= 255 in a 16-bit file are nearly black, not full-range 8-bit values.
    arr = np.array([[0, 200], [100, 255]], dtype=np.uint16)
    dec = decode_image(_png(Image.fromarray(arr)))
    assert int(dec.color.max()) <= 1


def test_decode_applies_exif_orientation():
    # 20 wide x 10 high: left half red, right half blue; orientation 6 = rotate 90 degrees clockwise to display.
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)
    arr[:, 10:] = (0, 0, 255)
    img = Image.fromarray(arr, mode="RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(img, exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).size == (20, 10)
    dec = decode_image(data)
    assert (dec.width, dec.height) == (10, 20)
    assert dec.color.shape == (3, 20, 10)
    top = dec.color[:, 2:8, 2:8].float().mean((1, 2))
    bottom = dec.color[:, 12:18, 2:8].float().mean((1, 2))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_decode_rejects_garbage_bytes_with_message():
    with pytest.raises(ImageRejected) as info:
        decode_image(b"this is definitely not an image \x00\x01\x02")
    assert str(info.value)
    assert "undecodable" in str(info.value)
    assert isinstance(info.value, ValueError)
    # The same bytes give the same message (it goes into the manifest): no object address in it.
    assert " at 0x" not in str(info.value)


def test_decode_rejects_empty_bytes():
    with pytest.raises(ImageRejected) as info:
        decode_image(b"")
    assert str(info.value)


def test_decode_rejects_truncated_png():
    data = _png(Image.fromarray(_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8), mode="RGB"))
    with pytest.raises(ImageRejected) as info:
        decode_image(data[: len(data) // 2])
    assert str(info.value)


def test_decode_rejects_image_over_max_pixels_naming_the_count():
    data = _png(Image.new("RGB", (12, 10)))
    with pytest.raises(ImageRejected) as info:
        decode_image(data, max_pixels=100)
    msg = str(info.value)
    assert "120" in msg
    assert "12x10" in msg
    # At exactly the limit it is accepted.
    assert decode_image(data, max_pixels=120).color.shape == (3, 10, 12)


def test_decode_max_pixels_is_the_only_size_limit(monkeypatch):
    # --max-pixels is the documented limit. Pillow has its own decompression-bomb limit: over MAX_IMAGE_PIXELS it
    # warns (decode_image silences that), over 2 * MAX_IMAGE_PIXELS (~179 million by default) Image.open *raises*
    # DecompressionBombError. So a user who raises --max-pixels above ~179 million still gets such images rejected
    # as "undecodable". Pillow's limit is scaled down here so the test stays tiny: 2500 pixels > 2 * 1000.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = _png(Image.new("L", (50, 50), 7))
    dec = decode_image(data, max_pixels=10_000)
    assert dec.color.shape == (1, 50, 50)


def test_decode_exif_orientation_keeps_palette_transparency():
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    pal.putpixel((3, 0), 1)  # top-right pixel opaque green
    exif = Image.Exif()
    exif[0x0112] = 6
    dec = decode_image(_png(pal, transparency=0, exif=exif.tobytes()))
    assert dec.color.shape == (3, 4, 2)
    assert dec.alpha is not None
    expected = np.zeros((4, 2), dtype=np.uint8)
    expected[3, 1] = 255  # top-right goes to bottom-right after a clockwise quarter turn
    assert np.array_equal(dec.alpha.numpy(), expected)
    assert dec.color[:, 3, 1].tolist() == [0, 255, 0]


# --------------------------------------------------------------------------------------------- resize / channels


def test_resize_uint8_shapes_and_dtype():
    imgs = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8)
    out = resize_uint8(imgs, (16, 16))
    assert out.shape == (2, 3, 16, 16)
    assert out.dtype == torch.uint8
    up = resize_uint8(imgs, (64, 80))
    assert up.shape == (2, 3, 64, 80)
    assert up.dtype == torch.uint8


def test_resize_uint8_is_identity_at_same_size_and_keeps_constants():
    imgs = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(resize_uint8(imgs, (8, 8)), imgs)
    const = torch.full((1, 3, 30, 20), 77, dtype=torch.uint8)
    assert torch.equal(resize_uint8(const, (7, 9)), torch.full((1, 3, 7, 9), 77, dtype=torch.uint8))
    extremes = torch.zeros((1, 1, 20, 20), dtype=torch.uint8)
    extremes[..., ::2, :] = 255
    out = resize_uint8(extremes, (5, 5))
    assert int(out.min()) >= 0 and int(out.max()) <= 255


def test_to_working_replicates_gray_into_three_channels():
    gray = torch.randint(0, 256, (1, 20, 30), dtype=torch.uint8)
    out = to_working(gray, 16, 3)
    assert out.shape == (3, 16, 16)
    assert out.dtype == torch.uint8
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert torch.equal(out[0:1], to_working(gray, 16, 1))


def test_to_working_shapes_for_rgb_and_gray_targets():
    rgb = torch.randint(0, 256, (3, 40, 24), dtype=torch.uint8)
    assert to_working(rgb, 32, 3).shape == (3, 32, 32)
    g = to_working(rgb, 28, 1)
    assert g.shape == (1, 28, 28)
    assert g.dtype == torch.uint8
    same = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert torch.equal(to_working(same, 32, 3), same)


def test_match_channels_and_to_gray():
    rgb = torch.tensor([[[255]], [[255]], [[255]]], dtype=torch.uint8)
    assert to_gray(rgb).tolist() == [[[255]]]
    red = torch.tensor([[[255]], [[0]], [[0]]], dtype=torch.uint8)
    assert to_gray(red).tolist() == [[[76]]]  # round(0.299 * 255)
    assert match_channels(red, 3) is red
    with pytest.raises(ValueError):
        match_channels(torch.zeros(2, 4, 4, dtype=torch.uint8), 3)


def test_resize_noise_keeps_linf_bound():
    g = torch.Generator().manual_seed(6)
    delta = (torch.rand(1, 3, 16, 16, generator=g) * 2 - 1) * EPS
    delta[..., ::2, ::2] = EPS
    for size in [(37, 53), (7, 5), (16, 16)]:
        out = resize_noise(delta, size)
        assert out.shape == (1, 3) + size
        assert (out.abs() <= EPS + 1e-6).all()


# --------------------------------------------------------------------------------------------- release_native


def _noise(channels: int, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    delta = (torch.rand(channels, 16, 16, generator=g) * 2 - 1) * EPS
    delta[:, ::3] = EPS
    delta[:, 1::3] = -EPS
    return delta


@pytest.mark.parametrize("shape", [(3, 37, 53), (1, 45, 20), (3, 9, 6)])
def test_release_native_keeps_shape_and_stays_within_8_levels(shape):
    color = torch.randint(0, 256, shape, dtype=torch.uint8)
    color[:, 0] = 0
    color[:, -1] = 255
    out = release_native(color, _noise(shape[0]))
    assert out.shape == color.shape
    assert out.dtype == torch.uint8
    assert linf(out, color) <= 8
    assert linf(out, color) > 0


def test_release_native_one_channel_noise_on_rgb_moves_every_channel_alike():
    color = torch.full((3, 21, 34), 128, dtype=torch.uint8)
    out = release_native(color, _noise(1))
    assert out.shape == (3, 21, 34)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert linf(out, color) <= 8


def test_release_native_three_channel_noise_on_gray_stays_gray():
    color = torch.randint(0, 256, (1, 30, 17), dtype=torch.uint8)
    out = release_native(color, _noise(3))
    assert out.shape == (1, 30, 17)
    assert out.dtype == torch.uint8
    assert linf(out, color) <= 8


@pytest.mark.parametrize(("image_channels", "noise_channels"), [(3, 3), (1, 1), (3, 1), (1, 3)])
def test_release_native_batch_is_release_native_image_by_image(image_channels, noise_channels):
    colors = torch.randint(0, 256, (5, image_channels, 23, 41), dtype=torch.uint8)
    noise = torch.stack([_noise(noise_channels, seed) for seed in range(5)])
    batch = release_native_batch(colors, noise)
    assert batch.shape == colors.shape and batch.dtype == torch.uint8
    for i in range(5):
        assert torch.equal(batch[i], release_native(colors[i], noise[i]))


def test_match_channels_on_a_batch_is_match_channels_per_image():
    rgb = torch.randint(0, 256, (4, 3, 5, 6), dtype=torch.uint8)
    gray = torch.randint(0, 256, (4, 1, 5, 6), dtype=torch.uint8)
    for images, channels in ((rgb, 1), (gray, 3), (rgb, 3)):
        batch = match_channels(images, channels)
        assert batch.shape == (4, channels, 5, 6)
        assert all(torch.equal(batch[i], match_channels(images[i], channels)) for i in range(4))


def test_release_native_zero_noise_is_identity():
    color = torch.randint(0, 256, (3, 13, 29), dtype=torch.uint8)
    assert torch.equal(release_native(color, torch.zeros(3, 16, 16)), color)


# --------------------------------------------------------------------------------------------- encode_png


@pytest.mark.parametrize("channels,with_alpha", [(1, False), (3, False), (3, True), (1, True)])
def test_encode_png_round_trips_exactly(channels, with_alpha):
    color = torch.randint(0, 256, (channels, 11, 19), dtype=torch.uint8)
    alpha = torch.randint(0, 256, (11, 19), dtype=torch.uint8) if with_alpha else None
    data = encode_png(color, alpha)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    dec = decode_image(data)
    assert torch.equal(dec.color, color)
    if with_alpha:
        assert dec.alpha is not None and torch.equal(dec.alpha, alpha)
    else:
        assert dec.alpha is None


def test_encode_png_is_deterministic():
    color = torch.randint(0, 256, (3, 24, 24), dtype=torch.uint8)
    alpha = torch.randint(0, 256, (24, 24), dtype=torch.uint8)
    assert encode_png(color) == encode_png(color.clone())
    assert encode_png(color, alpha) == encode_png(color.clone(), alpha.clone())


def test_encode_png_accepts_non_contiguous_input():
    color = torch.randint(0, 256, (3, 10, 12), dtype=torch.uint8)
    view = color.permute(0, 2, 1)  # 3 x 12 x 10, not contiguous
    dec = decode_image(encode_png(view))
    assert torch.equal(dec.color, view.contiguous())


# ---------------------------------------------------------------------------------------------------- photo metadata

XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6" tiff:Make="Cam"/>'
    b"</rdf:RDF></x:xmpmeta>"
)


def _camera_jpeg(icc: bytes | None, mode: str = "RGB") -> bytes:
    """A camera-like JPEG 20 wide x 10 high, shown rotated (EXIF orientation 6), with a make, a GPS position, XMP
    and the given ICC profile."""
    arr = np.zeros((10, 20, 3), dtype=np.uint8)
    arr[:, :10] = (255, 0, 0)
    img = Image.fromarray(arr, mode="RGB").convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "CameraMaker"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}
    kw = {"icc_profile": icc} if icc else {}
    return _jpeg(img, exif=exif, xmp=XMP, **kw)


def _srgb_icc() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_decode_without_metadata_holds_none_and_with_it_the_upright_photos_metadata():
    icc = _srgb_icc()
    data = _camera_jpeg(icc)
    plain = decode_image(data)
    assert (plain.icc, plain.exif, plain.xmp) == (None, None, None)  # the rounds hold pixels only
    dec = decode_image(data, metadata=True)
    assert dec.color.shape == (3, 20, 10) and dec.icc == icc
    exif = Image.Exif()
    exif.load(dec.exif)
    assert 0x0112 not in exif and exif[0x010F] == "CameraMaker"  # the orientation went with the rotation
    assert exif.get_ifd(0x8825)[1] == "N"
    assert b"tiff:Make" in dec.xmp and b"Orientation" not in dec.xmp


def test_encode_png_writes_only_the_metadata_it_is_given():
    icc = _srgb_icc()
    dec = decode_image(_camera_jpeg(icc), metadata=True)
    default = encode_png(dec.color, icc=dec.icc)  # what the export writes without --keep-metadata
    img = Image.open(io.BytesIO(default))
    assert img.size == (10, 20) and img.info.get("icc_profile") == icc
    assert len(img.getexif()) == 0 and b"eXIf" not in default and b"xmp" not in default.lower()
    assert b"GPS" not in default and b"CameraMaker" not in default
    kept = Image.open(io.BytesIO(encode_png(dec.color, icc=dec.icc, exif=dec.exif, xmp=dec.xmp)))
    exif = kept.getexif()
    assert exif[0x010F] == "CameraMaker" and exif.get_ifd(0x8825)[2] == (48.0, 51.0, 24.0) and 0x0112 not in exif
    assert "tiff:Make" in kept.info["XML:com.adobe.xmp"] and kept.info.get("icc_profile") == icc
    assert np.array_equal(np.asarray(kept), np.asarray(img))  # the same pixels either way


def test_an_icc_profile_for_another_colour_space_is_dropped():
    """A CMYK JPEG's profile describes CMYK, not the RGB it is released as; a Lab profile does not describe RGB."""
    from PIL import ImageCms

    cmyk_header = bytearray(_srgb_icc())
    cmyk_header[16:20] = b"CMYK"
    assert decode_image(_camera_jpeg(bytes(cmyk_header), mode="CMYK"), metadata=True).icc is None
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # not RGB either
    assert decode_image(_camera_jpeg(lab), metadata=True).icc is None
    assert decode_image(_camera_jpeg(_srgb_icc()), metadata=True).icc is not None


def test_metadata_that_cannot_be_rewritten_is_dropped_never_a_failure(monkeypatch):
    """The export decodes metadata the load did not: a photo accepted when loaded must not fail there. EXIF that
    Pillow cannot parse or rewrite is dropped (the safe side of stripping); the pixels and the profile stay."""
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.0)}  # upright already: the decode itself never rewrites the EXIF
    data = _jpeg(Image.new("RGB", (20, 10), (200, 30, 30)), exif=exif, icc_profile=_srgb_icc())
    assert decode_image(data, metadata=True).exif is not None

    def broken(self):
        raise ValueError("cannot write this EXIF")

    monkeypatch.setattr(Image.Exif, "tobytes", broken)
    assert decode_image(data).color.shape == (3, 10, 20)  # the load's decode does not touch metadata
    dec = decode_image(data, metadata=True)
    assert dec.color.shape == (3, 10, 20) and dec.exif is None and dec.xmp is None and dec.icc == _srgb_icc()


def test_encode_image_lossy_formats_are_deterministic_full_chroma_and_refuse_what_they_cannot_hold():
    from ops.image import decoded_release, encode_image, encoded_roundtrip, unencodable

    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 24, 40), dtype=torch.uint8, generator=g)
    gray = torch.randint(0, 256, (1, 24, 40), dtype=torch.uint8, generator=g)
    for fmt in ("jpeg", "webp"):
        a, b = encode_image(rgb, fmt=fmt, quality=90), encode_image(rgb, fmt=fmt, quality=90)
        assert a == b and Image.open(io.BytesIO(a)).format == fmt.upper()
        assert len(encode_image(rgb, fmt=fmt, quality=50)) < len(a)  # the quality reaches the encoder
        # WebP has no grayscale: a gray release decodes as RGB and is judged as gray again.
        assert decoded_release(encode_image(gray, fmt=fmt), 1).shape == (1, 24, 40)
        assert torch.equal(encoded_roundtrip(rgb, None, fmt, 90), decoded_release(a, 3))
    assert torch.equal(encoded_roundtrip(rgb, None, "png", None), rgb)
    # 4:4:4: a one-pixel colour checkerboard survives a JPEG at quality 95 (4:2:0 would average its chroma away).
    board = torch.zeros(3, 16, 16, dtype=torch.uint8)
    board[0, ::2, ::2] = board[0, 1::2, 1::2] = 255
    back = decoded_release(encode_image(board, fmt="jpeg", quality=95), 3).to(torch.int32)
    assert (back - board.to(torch.int32)).abs().max() < 40
    alpha = torch.full((24, 40), 200, dtype=torch.uint8)
    with pytest.raises(ValueError, match="alpha"):
        encode_image(rgb, alpha, fmt="jpeg")
    assert unencodable("webp", 20_000, 10, False) and unencodable("jpeg", 100, 100, False) is None
    assert unencodable("png", 100_000, 100_000, True) is None
    with pytest.raises(ValueError, match="encode format"):
        encode_image(rgb, fmt="gif")
