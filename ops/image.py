"""Image bytes in and out: decode to 8-bit arrays, resize to the working resolution, apply noise at native size,
encode (PNG, or JPEG / WebP: ``encode_image``).

An image is decoded into ``color`` (uint8 tensor, C x H x W with C = 1 for grayscale or 3 for RGB) and an optional
``alpha`` (uint8, H x W) that noise never touches. EXIF orientation is applied first; palette, CMYK, 16-bit and other
modes become 8-bit RGB (grayscale 16-bit becomes 8-bit grayscale).

Metadata (asked for with ``decode_image(..., metadata=True)``: the export needs it, the rounds do not): the ICC
colour profile, kept in the release when it describes the released channels (an RGB profile on RGB pixels, a gray
one on gray), so wide-gamut photos keep their colours; and the EXIF and XMP blocks, released only on request
(``--keep-metadata``), since they hold where and when a photo was taken. The orientation in them is dropped with the
rotation it described (the pixels are released upright).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, PngImagePlugin

from ops.choices import DEFAULT_ENCODE_QUALITY, DEFAULT_MAX_PIXELS, ENCODE_FORMATS, LOSSY_FORMATS
from ops.noise import release_uint8


class ImageRejected(ValueError):
    """The bytes are not an image we can protect; the message says why (it goes into the manifest's ``error``)."""


@dataclass
class DecodedImage:
    color: torch.Tensor  # uint8, C x H x W, C in {1, 3}
    alpha: torch.Tensor | None  # uint8, H x W, or None
    icc: bytes | None = None  # the ICC profile of ``color``'s colour space (dropped when it describes another)
    exif: bytes | None = None  # the EXIF block, orientation removed
    xmp: bytes | None = None  # the XMP packet, orientation removed

    @property
    def height(self) -> int:
        return int(self.color.shape[1])

    @property
    def width(self) -> int:
        return int(self.color.shape[2])


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, metadata: bool = False) -> DecodedImage:
    """Decode image bytes (any format Pillow reads) into 8-bit color channels and an optional alpha (and, with
    ``metadata``, the ICC profile, EXIF and XMP that go with the upright pixels)."""
    if not data:
        raise ImageRejected("empty image member")
    try:
        # Our --max-pixels check (on the header, before any pixel is decoded) replaces Pillow's own bomb limit,
        # which would otherwise reject images over ~179 million pixels even when --max-pixels allows them.
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            # Check the header's size before decoding a single pixel: a decompression bomb never gets allocated.
            if width * height > max_pixels:
                raise ImageRejected(
                    f"image is {width}x{height} = {width * height} pixels, over --max-pixels {max_pixels}"
                )
            img = ImageOps.exif_transpose(img)
            img.load()
    except ImageRejected:
        raise
    except Exception as exc:  # Pillow raises many types for bad data; each becomes one clear rejection.
        # Without object reprs ("<_io.BytesIO object at 0x...>"): the manifest's bytes must not change between runs.
        message = re.sub(r" <[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc))
        raise ImageRejected(f"undecodable image: {type(exc).__name__}: {message}") from exc
    if img.width < 1 or img.height < 1:
        raise ImageRejected("image has no pixels")
    decoded = _to_channels(img)
    if metadata:
        decoded.icc = _matching_icc(img.info.get("icc_profile"), decoded.color.shape[0])
        try:
            exif = img.getexif()
            # exif_transpose removed the orientation it applied; any other value left (1, or invalid) goes too.
            exif.pop(ORIENTATION, None)
            decoded.exif = exif.tobytes() if len(exif) else None
            xmp = img.info.get("xmp") or img.info.get("XML:com.adobe.xmp")
            if isinstance(xmp, str):
                xmp = xmp.encode()
            decoded.xmp = _XMP_ORIENTATION.sub(b"", xmp) if xmp else None
        except Exception:  # noqa: BLE001 - metadata Pillow cannot rewrite is dropped (stripping is the safe side);
            # the pixels decoded above, so the sample is released as it was accepted when loaded
            decoded.exif = decoded.xmp = None
    return decoded


ORIENTATION = 0x0112
_XMP_ORIENTATION = re.compile(rb'\s*tiff:Orientation="[^"]*"|<tiff:Orientation>[^<]*</tiff:Orientation>')
# An ICC profile's colour space (header bytes 16-19) for the channel counts we release.
_ICC_SPACE = {3: b"RGB ", 1: b"GRAY"}


def _matching_icc(icc: bytes | None, channels: int) -> bytes | None:
    """The profile when it describes ``channels``' colour space (a CMYK JPEG's profile does not describe the RGB it
    is converted to); otherwise None (the release is then plain sRGB, as the pixels were converted)."""
    if not icc or len(icc) < 128 or icc[16:20] != _ICC_SPACE.get(channels):
        return None
    return bytes(icc)


def _to_channels(img: Image.Image) -> DecodedImage:
    mode = img.mode
    alpha = None
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int64)
        # 16-bit (or 32-bit integer) grayscale: keep the top 8 bits rather than clipping at 255.
        top = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr8 = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return DecodedImage(torch.from_numpy(arr8)[None].contiguous(), None)
    if mode == "L":
        return DecodedImage(torch.from_numpy(np.array(img, dtype=np.uint8))[None].contiguous(), None)
    if mode in ("LA", "La"):
        arr = np.array(img.convert("LA"), dtype=np.uint8)
        return DecodedImage(torch.from_numpy(arr[..., 0].copy())[None], torch.from_numpy(arr[..., 1].copy()))
    if mode == "P" and "transparency" in img.info or mode in ("RGBA", "RGBa", "PA"):
        rgba = np.array(img.convert("RGBA"), dtype=np.uint8)
        color = torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).contiguous()
        return DecodedImage(color, torch.from_numpy(rgba[..., 3].copy()))
    if mode == "1":
        img = img.convert("L")
        return DecodedImage(torch.from_numpy(np.array(img, dtype=np.uint8))[None].contiguous(), alpha)
    rgb = np.array(img.convert("RGB"), dtype=np.uint8)
    return DecodedImage(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), alpha)


def match_channels(color: torch.Tensor, channels: int) -> torch.Tensor:
    """Bring a C x H x W image (or an N x C x H x W batch) to the corpus's working channel count (grayscale is
    replicated into RGB)."""
    have = color.shape[-3]
    if have == channels:
        return color
    if have == 1 and channels == 3:
        return color.expand(*color.shape[:-3], 3, *color.shape[-2:]).contiguous()
    if have == 3 and channels == 1:
        return to_gray(color)
    raise ValueError(f"cannot map {have} channels to {channels}")


def to_gray(color: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of a (N x) 3 x H x W uint8 or float tensor, as (N x) 1 x H x W of the same dtype."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=color.device).view(3, 1, 1)
    gray = (color.to(torch.float32) * w).sum(-3, keepdim=True)
    return gray.round().clamp(0, 255).to(torch.uint8) if color.dtype == torch.uint8 else gray.to(color.dtype)


def resize_uint8(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a uint8 (N x C x H x W) batch with antialiased bilinear filtering, rounding back to uint8."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images.to(torch.float32), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def to_working(color: torch.Tensor, resolution: int, channels: int) -> torch.Tensor:
    """One decoded image (uint8 C x H x W) at the working resolution: uint8 channels x R x R."""
    return resize_uint8(match_channels(color, channels)[None], (resolution, resolution))[0]


def resize_noise(delta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize working-resolution noise (N x C x R x R float) to a native size, bilinearly.

    Bilinear weights are a convex combination (antialiased or not), so the L-inf bound of delta carries over.
    """
    if tuple(delta.shape[-2:]) == tuple(size):
        return delta
    return F.interpolate(delta, size=size, mode="bilinear", align_corners=False, antialias=True)


def release_native(color: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Apply working-resolution noise (C' x R x R float) to one native image (uint8 C x H x W): the released pixels.

    One-channel noise on an RGB image is added to every channel; three-channel noise on a grayscale image is
    averaged to one channel, so grayscale stays grayscale.
    """
    return release_native_batch(color[None], delta[None])[0]


def release_native_batch(colors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """``release_native`` on N images of one native size (uint8 N x C x H x W) and their noise (N x C' x R x R), in
    one call on whatever device they are on (the stop check runs it on the worker's device)."""
    noise = resize_noise(deltas.to(torch.float32), (colors.shape[-2], colors.shape[-1]))
    if noise.shape[1] == 3 and colors.shape[1] == 1:
        noise = noise.mean(1, keepdim=True)
    elif noise.shape[1] == 1 and colors.shape[1] == 3:
        noise = noise.expand(-1, 3, -1, -1)
    return release_uint8(colors, noise)


# What each lossy format can hold: JPEG has no alpha; both cap the side length.
MAX_SIDE = {"jpeg": 65_535, "webp": 16_383}


def encode_png(
    color: torch.Tensor,
    alpha: torch.Tensor | None = None,
    *,
    icc: bytes | None = None,
    exif: bytes | None = None,
    xmp: bytes | None = None,
) -> bytes:
    """Encode uint8 channels (and an untouched alpha) as PNG, with the given ICC profile, EXIF and XMP chunks and
    nothing else; deterministic bytes for the same pixels and metadata."""
    return encode_image(color, alpha, icc=icc, exif=exif, xmp=xmp)


def encode_image(
    color: torch.Tensor,
    alpha: torch.Tensor | None = None,
    *,
    fmt: str = "png",
    quality: int | None = None,
    icc: bytes | None = None,
    exif: bytes | None = None,
    xmp: bytes | None = None,
) -> bytes:
    """Encode uint8 channels (and an untouched alpha) as ``fmt`` (``ENCODE_FORMATS``), with the given ICC profile,
    EXIF and XMP and nothing else; deterministic bytes for the same pixels, metadata and settings.

    JPEG keeps full chroma resolution (4:4:4): the noise lives in per-pixel colour detail that 4:2:0 would average
    away. WebP keeps the colours under fully transparent pixels (``exact``), as the alpha is released untouched.
    A JPEG of an image with alpha is refused (ValueError); ``unencodable`` says so before any work is spent."""
    arr = color.permute(1, 2, 0).contiguous().numpy()
    if alpha is not None:
        arr = np.concatenate([arr, alpha.numpy()[..., None]], axis=2)
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr, mode=("L", "LA", "RGB", "RGBA")[arr.shape[2] - 1])
    extra: dict = {}
    if icc:
        extra["icc_profile"] = icc
    if exif:
        extra["exif"] = exif
    buf = io.BytesIO()
    if fmt == "png":
        if xmp:
            info = PngImagePlugin.PngInfo()
            info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8", "replace"))
            extra["pnginfo"] = info
        img.save(buf, format="PNG", compress_level=6, **extra)
    elif fmt in LOSSY_FORMATS:
        problem = unencodable(fmt, img.width, img.height, alpha is not None)
        if problem:
            raise ValueError(problem)
        if xmp:
            extra["xmp"] = xmp
        q = DEFAULT_ENCODE_QUALITY if quality is None else int(quality)
        if fmt == "jpeg":
            img.save(buf, format="JPEG", quality=q, subsampling=0, optimize=False, **extra)
        else:
            img.save(buf, format="WEBP", quality=q, method=4, exact=True, **extra)
    else:
        raise ValueError(f"unknown encode format {fmt!r}; choose one of {', '.join(ENCODE_FORMATS)}")
    return buf.getvalue()


def unencodable(fmt: str, width: int, height: int, has_alpha: bool) -> str | None:
    """Why an image of this size and alpha cannot be released as ``fmt`` (a manifest error), or None."""
    if fmt == "jpeg" and has_alpha:
        return "has an alpha channel, which JPEG cannot hold (use --encode-format png or webp)"
    side = MAX_SIDE.get(fmt)
    if side is not None and max(width, height) > side:
        return f"{width}x{height} is over {fmt.upper()}'s {side:,}-pixel side (use --encode-format png)"
    return None


def decoded_release(data: bytes, channels: int) -> torch.Tensor:
    """The uint8 pixels (``channels`` x H x W) a victim decodes from released bytes: what the stop check, the probe
    and the manifest's ``linf`` measure. (WebP has no grayscale: a gray image comes back as equal RGB channels.)"""
    return match_channels(decode_image(data).color, channels)


def encoded_roundtrip(color: torch.Tensor, alpha: torch.Tensor | None, fmt: str, quality: int | None) -> torch.Tensor:
    """``color`` as a victim gets it from a ``fmt`` release: encoded, then decoded (the same channels)."""
    if fmt == "png":
        return color
    return decoded_release(encode_image(color, alpha, fmt=fmt, quality=quality), color.shape[0])
