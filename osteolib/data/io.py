"""Read any X-ray file into one float grayscale array with its metadata.

:func:`read_xray` is the only way the project decodes an image. It returns an :class:`XrayImage`
whose ``pixels`` are float32, H x W, in [0, 1], bright = dense tissue (the DICOM MONOCHROME2
convention), whatever the file was:

* PNG / JPEG / TIFF / BMP ... (via Pillow): divided by the largest value the *stored type* can hold
  (255 for 8-bit, 65535 for 16-bit). There is deliberately no per-image contrast stretching, so
  that two files with the same stored values give the same pixels and a dark image stays dark.
  Pillow would cut 16-bit-per-channel colour files (RGB, RGBA, gray + alpha PNG/TIFF) to 8 bits; those
  are decoded again at full depth with OpenCV (``meta["bit_depth"]`` 16, ``meta["mode"]`` e.g. ``RGB;16``).
* DICOM (via pydicom): the Modality LUT (rescale slope/intercept) first, then the VOI window from
  the header when there is one, else the min/max of the data; MONOCHROME1 is inverted. A header
  declaring more than :data:`MAX_DICOM_PIXELS` pixels (Rows x Columns x frames; environment variable
  ``OSTEOLIB_MAX_DICOM_PIXELS`` overrides it) is refused before any pixel data is read, as Pillow
  refuses a decompression bomb.
* RGB / RGBA / palette files that are really grayscale give exactly their gray channel; truly
  coloured files (screenshots with coloured annotations) are converted with luminance weights and
  flagged in ``meta["was_color"]`` / ``meta["color_warning"]``. Alpha never reaches the pixels.

A file that cannot be read raises :class:`XrayReadError` naming the file, the reason and what to
do. :func:`scan_files` reads many files and reports every failure in a table without raising;
:func:`check_readable` raises one :class:`BadFilesError` listing all bad files at once.
"""
from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

# Pillow formats accepted as X-ray images. Anything else Pillow happens to recognise (icons,
# Photoshop files, ...) is refused with a reason rather than decoded into something odd.
PIL_FORMATS = ("PNG", "JPEG", "JPEG2000", "TIFF", "BMP", "PPM", "GIF", "WEBP")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")

# Signatures of the common image containers; a file starting with one of them is never treated
# as DICOM even when it is (wrongly) called *.dcm.
_IMAGE_MAGICS = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF8", b"RIFF")

# Two channels differing by at most this fraction of full scale count as "the same gray":
# a gray JPEG stored as RGB drifts by a few levels through chroma rounding, while a coloured
# annotation differs by far more.
GRAY_TOLERANCE = 16 / 255
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's "L"

# The DICOM counterpart of PIL.Image.MAX_IMAGE_PIXELS: a header declaring more pixels (Rows x Columns x
# NumberOfFrames) is refused before its pixel data is read or decoded. 50 megapixels (100 MB at 16 bits) is
# about twice the largest single-exposure radiograph (50 um mammography, ~28 Mpx). The environment variable
# OSTEOLIB_MAX_DICOM_PIXELS, when set, overrides this constant (0 or "none": no limit).
MAX_DICOM_PIXELS = 50_000_000
MAX_DICOM_PIXELS_ENV = "OSTEOLIB_MAX_DICOM_PIXELS"

_DEFAULT_HINT = "check the file (open it in a viewer), re-export it (e.g. as PNG), or remove it from the manifest"


class XrayReadError(ValueError):
    """One file could not be read as an X-ray; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str, hint: str = _DEFAULT_HINT) -> None:
        self.path = str(path)
        self.reason = reason
        self.hint = hint
        super().__init__(f"{self.path}: {reason}. What to do: {hint}.")


class BadFilesError(ValueError):
    """Several files could not be read; ``failures`` lists every one as (path, reason)."""

    MAX_LISTED = 50

    def __init__(self, failures: list[tuple[str, str]], total: int) -> None:
        self.failures = list(failures)
        self.total = total
        lines = [f"  {path}: {reason}" for path, reason in self.failures[: self.MAX_LISTED]]
        if len(self.failures) > self.MAX_LISTED:
            lines.append(f"  ... and {len(self.failures) - self.MAX_LISTED} more (see the .failures attribute)")
        super().__init__(
            f"{len(self.failures)} of {total} file(s) cannot be read as X-rays:\n" + "\n".join(lines)
            + "\nWhat to do: repair or re-export these files, or remove their rows from the manifest "
            "(scan_files() gives the same list as a table)."
        )


@dataclass
class XrayImage:
    """A decoded X-ray: ``pixels`` float32 H x W in [0, 1] (bright = dense), ``meta`` about the file.

    ``meta`` always holds ``path, format, bit_depth, width, height, mode, was_color, window``;
    files with colour, alpha, several frames or a data-derived range say so in further keys,
    and DICOM files add the header fields a manifest can use (``PatientID``, ``ViewPosition``,
    ``PixelSpacing``, ...) when present.
    """

    pixels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The one entry point


def read_xray(path: str | os.PathLike) -> XrayImage:
    """Decode one X-ray file (PNG 8/16-bit, JPEG, TIFF, BMP, DICOM ...) into an :class:`XrayImage`.

    DICOM is recognised by content (the ``DICM`` marker at byte 128, or a preamble-less data set)
    or by a ``.dcm`` extension. Raises :class:`XrayReadError` for a missing, empty, truncated,
    corrupt or unsupported file, before any further work is done with it.
    """
    if not isinstance(path, (str, os.PathLike)) or str(path).strip() == "":
        raise XrayReadError(_as_text(path) or "<empty path>", f"no usable file path was given (got {path!r})",
                            "fill in the path column of the manifest for this row")
    path_str = os.fspath(path)
    _check_is_nonempty_file(path_str)
    try:
        fh = open(path_str, "rb")
    except OSError as exc:
        raise XrayReadError(path_str, f"cannot open the file ({type(exc).__name__}: {exc})",
                            "check that the file is readable by this user") from exc
    with fh:
        head = fh.read(132)
        if _looks_like_dicom(head, path_str):
            return _read_dicom(path_str)
        fh.seek(0)
        return _read_with_pillow(path_str, fh)


def _check_is_nonempty_file(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise XrayReadError(path, "file not found",
                            "check the path (and the data root setting), or remove the row from the manifest") from None
    except (NotADirectoryError, PermissionError, OSError) as exc:
        raise XrayReadError(path, f"cannot access the file ({type(exc).__name__}: {exc})",
                            "check the path and its permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise XrayReadError(path, "is a directory, not an image file",
                            "point at the image files inside it (scan_files() accepts a folder)")
    if info.st_size == 0:
        raise XrayReadError(path, "file is empty (0 bytes)",
                            "the copy or download was probably interrupted; copy the file again")


def _looks_like_dicom(head: bytes, path: str) -> bool:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if head.startswith(_IMAGE_MAGICS):
        return False
    # A DICOM data set written without the 128-byte preamble starts directly with an element of
    # the file-meta group (0002,xxxx) or the identifying group (0008,xxxx), little endian.
    if len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0:
        return True
    return Path(path).suffix.lower() in DICOM_EXTENSIONS


# --------------------------------------------------------------------------------------------
# Pillow formats


def _read_with_pillow(path: str, fh) -> XrayImage:
    try:
        image = Image.open(fh)
    except Image.UnidentifiedImageError:
        raise XrayReadError(path, "not a recognised image format (neither an image Pillow can read nor DICOM)",
                            f"convert it to PNG or DICOM; readable formats are {', '.join(PIL_FORMATS)} and DICOM") from None
    except Image.DecompressionBombError as exc:
        raise XrayReadError(path, f"the image declares more pixels than Pillow's limit ({exc})",
                            "if the file is genuine, raise PIL.Image.MAX_IMAGE_PIXELS before reading it") from None
    except Exception as exc:
        raise XrayReadError(path, f"the image header is corrupt ({type(exc).__name__}: {exc})") from exc
    with image:
        if image.format not in PIL_FORMATS:
            raise XrayReadError(path, f"{image.format} files are not an X-ray format osteolib reads",
                                f"convert it to PNG; readable formats are {', '.join(PIL_FORMATS)} and DICOM")
        n_frames = getattr(image, "n_frames", 1)
        rawmode = _rawmode(image)  # known only before load()
        try:
            # Pillow decodes lazily: only load() reads every byte, so a truncated or corrupt file
            # fails here instead of yielding a silently padded image later.
            image.load()
        except Exception as exc:
            raise XrayReadError(path, f"the image data is truncated or corrupt ({type(exc).__name__}: {exc})",
                                "the file was probably cut off while copying; copy or export it again") from exc
        meta: dict[str, Any] = {
            "path": os.path.abspath(path),
            "format": image.format.lower(),
            "mode": image.mode,
            "width": image.width,
            "height": image.height,
            "was_color": False,
            "window": None,
        }
        if n_frames > 1:
            meta["n_frames"] = n_frames
            meta["frame_note"] = f"file holds {n_frames} frames/pages; only the first was read"
        if image.mode in ("RGB", "RGBA", "LA") and ";16" in rawmode:
            fh.seek(0)
            pixels, bit_depth = _colour16_pixels(path, fh.read(), image.size, rawmode, meta)
        else:
            pixels, bit_depth = _pillow_pixels(image, meta)
    meta["bit_depth"] = bit_depth
    return XrayImage(pixels=pixels, meta=meta)


def _rawmode(image: Image.Image) -> str:
    """How the file stores its pixels (``"RGB;16B"``), from Pillow's tile list; "" when unknown."""
    try:
        args = image.tile[0].args if hasattr(image.tile[0], "args") else image.tile[0][3]
    except (IndexError, TypeError, AttributeError):
        return ""
    if isinstance(args, tuple):
        args = args[0] if args else ""
    return args if isinstance(args, str) else ""


def _colour16_pixels(path: str, data: bytes, size: tuple[int, int], rawmode: str,
                     meta: dict[str, Any]) -> tuple[np.ndarray, int]:
    """16-bit-per-channel RGB / RGBA / gray+alpha at full depth (Pillow keeps only the high byte of these)."""
    try:
        import cv2  # opencv-python(-headless): a dependency of grad-cam; imported only for these files
    except ImportError:
        raise XrayReadError(path, f"16-bit colour image ({rawmode}) needs OpenCV to be read at full depth",
                            "pip install opencv-python-headless, or re-export the image as 16-bit grayscale "
                            "PNG") from None
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.shape[1::-1] != tuple(size) or array.dtype != np.uint16:
        got = "nothing" if array is None else f"{array.shape} {array.dtype}"
        raise XrayReadError(path, f"16-bit colour image ({rawmode}, {size[0]} x {size[1]}) cannot be decoded at full "
                            f"depth (OpenCV gave {got})", "re-export the image as 16-bit grayscale PNG")
    meta["mode"] = rawmode.split(";")[0] + ";16"
    if array.ndim == 2:
        return _scale(array, 65535.0), 16
    rgb = array[..., 2::-1] if array.shape[2] >= 3 else np.repeat(array[..., :1], 3, axis=2)  # OpenCV: BGR(A)
    gray = _gray_from_channels(rgb, 65535.0, meta)
    if array.shape[2] in (2, 4):
        gray = _drop_alpha(gray, array[..., -1], meta, 65535.0)
    return gray, 16


def _pillow_pixels(image: Image.Image, meta: dict[str, Any]) -> tuple[np.ndarray, int]:
    """Turn a loaded Pillow image into float32 [0, 1] gray pixels; returns (pixels, bit depth)."""
    mode = image.mode
    if mode == "L":
        return _scale(np.asarray(image), 255.0), 8
    if mode == "1":
        return np.asarray(image, dtype=np.float32), 1
    if mode.startswith("I;16"):  # I;16, I;16L, I;16B, I;16N: 16-bit gray at full depth
        return _scale(np.asarray(image), 65535.0), 16
    if mode == "I":
        data = np.asarray(image)
        if image.format == "PNG":  # older Pillow opens 16-bit gray PNG as 32-bit "I"
            return _scale(data, 65535.0), 16
        return _data_range_scaled(data, meta, "32-bit integer image has no fixed value range"), 32
    if mode == "F":
        data = np.asarray(image, dtype=np.float32)
        if np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0:
            return data.copy(), 32
        return _data_range_scaled(data, meta, "floating-point image outside [0, 1]"), 32
    if mode == "LA":
        data = np.asarray(image)
        return _drop_alpha(data[..., 0].astype(np.float32), data[..., 1], meta) / np.float32(255.0), 8
    # Colour and palette modes: look at the three channels (and alpha when there is one).
    has_alpha = mode in ("RGBA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    rgb_image = image.convert("RGBA" if has_alpha else "RGB")
    data = np.asarray(rgb_image)
    gray = _gray_from_channels(data[..., :3], 255.0, meta)
    if has_alpha:
        gray = _drop_alpha(gray, data[..., 3], meta)
    return gray, 8


def _scale(data: np.ndarray, full_scale: float) -> np.ndarray:
    return np.divide(data, np.float32(full_scale), dtype=np.float32)


def _data_range_scaled(data: np.ndarray, meta: dict[str, Any], why: str) -> np.ndarray:
    """Min-max over the data, for stored types without a natural full scale; recorded in meta."""
    values = data.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        meta["nonfinite_pixels"] = int((~finite).sum())
        values = np.where(finite, values, np.nan)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    meta["range_source"] = f"data min/max ({why})"
    meta["data_range"] = (low, high)
    scaled = np.zeros(values.shape, dtype=np.float32) if high <= low else ((values - low) / (high - low))
    return np.nan_to_num(scaled, nan=0.0).astype(np.float32)


def _gray_from_channels(rgb: np.ndarray, full_scale: float, meta: dict[str, Any]) -> np.ndarray:
    """Gray pixels from an H x W x 3 array: the channel itself when R=G=B, else luminance."""
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(red, green) and np.array_equal(green, blue):
        return _scale(red, full_scale)
    spread = rgb.max(axis=2).astype(np.float32) - rgb.min(axis=2)
    coloured = int((spread > GRAY_TOLERANCE * full_scale).sum())
    gray = np.tensordot(rgb.astype(np.float32), LUMA_WEIGHTS, axes=([2], [0])) / np.float32(full_scale)
    if coloured:
        meta["was_color"] = True
        meta["color_warning"] = (
            f"{coloured} of {spread.size} pixels are coloured (channels differ by more than "
            f"{GRAY_TOLERANCE:.3f} of full scale); converted with luminance weights. Coloured marks "
            "(annotations, overlays) end up burnt into the gray image: prefer the original radiograph."
        )
    return np.clip(gray, 0.0, 1.0).astype(np.float32, copy=False)


def _drop_alpha(gray: np.ndarray, alpha: np.ndarray, meta: dict[str, Any], full_scale: float = 255.0) -> np.ndarray:
    """Remove the alpha channel: opaque files lose nothing, others are composited on black."""
    transparent = int((alpha < full_scale).sum())
    if transparent == 0:
        meta["alpha"] = "alpha channel dropped (all pixels fully opaque)"
        return gray
    meta["alpha"] = (f"alpha channel dropped after compositing on black "
                     f"({transparent} of {alpha.size} pixels were not fully opaque)")
    return gray * (alpha.astype(np.float32) / np.float32(full_scale))


# --------------------------------------------------------------------------------------------
# DICOM


def _read_dicom(path: str) -> XrayImage:
    import pydicom  # imported here: PNG-only runs never pay for it
    from pydicom.pixels import apply_color_lut
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    limit = max_dicom_pixels()  # a bad setting is the setting's error, not the file's
    try:
        # The header alone first (force: also files without the preamble), so that a declared size over the
        # limit stops before the pixel data is read into memory or decoded.
        header = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        _check_dicom_size(path, header, limit)
        ds = pydicom.dcmread(path, force=True)
    except XrayReadError:
        raise
    except Exception as exc:
        raise XrayReadError(path, f"not a readable DICOM file ({type(exc).__name__}: {exc})",
                            "check that it really is DICOM; re-export it from the PACS/viewer") from exc
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise XrayReadError(path, "DICOM file has no pixel data (not an image object, or cut off before the pixels)",
                            "re-export the image; a structured report or DICOMDIR is not an X-ray")

    meta: dict[str, Any] = {"path": os.path.abspath(path), "format": "dicom", "was_color": False, "window": None}
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None or "TransferSyntaxUID" not in file_meta:
        # A preamble-less file may lack the file-meta group; the encoding pydicom detected while
        # parsing tells which uncompressed transfer syntax it uses.
        implicit_vr, little_endian = ds.original_encoding
        if implicit_vr is None or not little_endian:
            raise XrayReadError(path, "DICOM file has no Transfer Syntax UID and its encoding cannot be inferred",
                                "re-export it as a standard DICOM file (Part 10, with file meta information)")
        ds.ensure_file_meta()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
        meta["transfer_syntax_note"] = f"no Transfer Syntax UID in the file; assumed {ds.file_meta.TransferSyntaxUID.name}"
    transfer_syntax = ds.file_meta.TransferSyntaxUID

    n_frames = max(_int_or(ds.get("NumberOfFrames"), 1), 1)
    try:
        if n_frames > 1 and hasattr(ds, "pixel_array_options"):  # pydicom >= 3: decode the first frame only
            ds.pixel_array_options(index=0)
            data = ds.pixel_array
            data = data[0] if data.ndim > 2 + (int(ds.get("SamplesPerPixel", 1) or 1) > 1) else data
        else:
            data = ds.pixel_array
            data = data[0] if n_frames > 1 else data
    except Exception as exc:
        if transfer_syntax.is_compressed:
            hint = (f"its transfer syntax ({transfer_syntax.name}) needs a decoder plugin: install pylibjpeg "
                    "(+ pylibjpeg-libjpeg / -openjpeg) or python-gdcm, or decompress the file (e.g. gdcmconv --raw)")
        else:
            hint = "the file is probably truncated or its image header (group 0028) is inconsistent; re-export it"
        raise XrayReadError(path, f"DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc})", hint) from exc

    if n_frames > 1:
        meta["n_frames"] = n_frames
        meta["frame_note"] = f"file holds {n_frames} frames; only the first was read"

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    meta.update(mode=photometric, photometric=photometric, bit_depth=bits_stored)

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(data, ds)
        pixels = _gray_from_channels(rgb, float(np.iinfo(rgb.dtype).max), meta)
    elif samples == 3:  # RGB, or YBR that pydicom already converted to RGB
        pixels = _gray_from_channels(data, float(2 ** bits_stored - 1), meta)
    else:
        try:
            pixels = _dicom_gray(data, ds, meta)
        except (ValueError, NotImplementedError, AttributeError, IndexError, KeyError, struct.error) as exc:
            raise XrayReadError(path, f"the DICOM grayscale transform (Modality/VOI LUT or window) cannot be "
                                f"applied ({type(exc).__name__}: {exc})",
                                "the header's LUT elements are inconsistent; re-export the image") from exc
        if photometric == "MONOCHROME1":  # stored with bright = air: flip to bright = dense
            pixels = np.float32(1.0) - pixels
            meta["inverted"] = True
    meta["height"], meta["width"] = int(pixels.shape[0]), int(pixels.shape[1])
    meta.update(_dicom_header_fields(ds))
    return XrayImage(pixels=np.ascontiguousarray(pixels, dtype=np.float32), meta=meta)


def max_dicom_pixels() -> int | None:
    """The DICOM pixel limit in force: ``$OSTEOLIB_MAX_DICOM_PIXELS`` when set, else :data:`MAX_DICOM_PIXELS`.

    0 or "none" means no limit (None).
    """
    text = os.environ.get(MAX_DICOM_PIXELS_ENV, "").strip().replace("_", "")
    if not text:
        return MAX_DICOM_PIXELS or None
    if text.lower() == "none":
        return None
    try:
        limit = int(float(text))
    except ValueError:
        raise ValueError(f"{MAX_DICOM_PIXELS_ENV}={os.environ[MAX_DICOM_PIXELS_ENV]!r} is not a number of pixels; "
                         f"set it to e.g. 200000000, or to none for no limit") from None
    return limit if limit > 0 else None


def _check_dicom_size(path: str, header, limit: int | None) -> None:
    """Refuse a header declaring more than ``limit`` pixels, naming the file and the way out."""
    rows, columns = _int_or(header.get("Rows"), 0), _int_or(header.get("Columns"), 0)
    if not (rows and columns):
        return  # no image header: the pixel data check that follows says what is wrong
    frames = max(_int_or(header.get("NumberOfFrames"), 1), 1)
    total = rows * columns * frames
    if limit is not None and total > limit:
        frames_text = f" x {frames} frames" if frames > 1 else ""
        raise XrayReadError(
            path, f"DICOM header declares {columns} x {rows} pixels{frames_text} = {total:,} pixels, more than the "
            f"limit of {limit:,} (a guard against corrupt or hostile headers; nothing was decoded)",
            f"if the image is genuine, raise the limit: set the environment variable {MAX_DICOM_PIXELS_ENV} (e.g. "
            f"{MAX_DICOM_PIXELS_ENV}={_round_up(total)}; none = no limit) or osteolib.data.io.MAX_DICOM_PIXELS "
            f"before reading; otherwise re-export the file")


def _int_or(value, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _round_up(number: int) -> int:
    step = 10 ** max(len(str(number)) - 2, 0)
    return -(-number // step) * step


def _dicom_gray(data: np.ndarray, ds, meta: dict[str, Any]) -> np.ndarray:
    """Modality LUT, then VOI window (or VOI LUT, or the data range) -> float32 in [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = apply_modality_lut(data, ds)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        meta["rescale"] = (float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0))
    values = np.asarray(values, dtype=np.float64)

    center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        meta["window"] = (center, width)
        meta["voi_function"] = function
        return _apply_window(values, center, width, function)
    if center is not None or width is not None:
        meta["window_note"] = f"header window ignored (center={center}, width={width} is not usable)"
    if ds.get("VOILUTSequence"):
        out_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        meta["voi_lut"] = f"VOI LUT sequence applied ({out_bits}-bit output)"
        # The LUT is indexed by the (integer) modality values.
        mapped = apply_voi(np.rint(values).astype(np.int64), ds)
        return np.clip(np.asarray(mapped, dtype=np.float32) / np.float32(2 ** out_bits - 1), 0.0, 1.0)
    return _data_range_scaled(values, meta, "DICOM header has no window")


def _first_value(value) -> float | None:
    """WindowCenter/Width may hold several alternatives; the first is the default one."""
    if isinstance(value, (str, bytes)) or value is None:
        value = value or None
    elif not isinstance(value, (int, float)):  # pydicom MultiValue (or a list)
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The VOI LUT functions of DICOM PS3.3 C.11.2.1.2, with output range [0, 1]."""
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        out = (values - center) / width + 0.5
    elif width <= 1.0:  # LINEAR with width 1 is a threshold at center - 0.5
        out = (values > center - 0.5).astype(np.float64)
    else:  # LINEAR (the default): the half-pixel offsets are part of the standard's definition
        out = (values - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _dicom_header_fields(ds) -> dict[str, Any]:
    """Header values a manifest can use (patient, view, spacing), only when present and non-empty."""
    fields: dict[str, Any] = {}
    for key in ("PatientID", "ViewPosition", "Modality", "BodyPartExamined"):
        value = ds.get(key)
        if value not in (None, ""):
            fields[key] = str(value).strip()
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value not in (None, "") and len(value) == 2:
            fields[key] = (float(value[0]), float(value[1]))
    return fields


# --------------------------------------------------------------------------------------------
# Many files: audit without raising, or fail once listing every bad file

SCAN_COLUMNS = ["path", "ok", "reason", "format", "bit_depth", "width", "height", "was_color"]


def scan_files(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> pd.DataFrame:
    """Try to read every file; one row per input path (never raises for a bad file, never drops one).

    ``paths`` is an iterable of file paths, or one folder (all files below it, hidden ones
    included, sorted). Columns: ``path`` (as given), ``ok``, ``reason`` ("" when ok), ``format``,
    ``bit_depth``, ``width``, ``height``, ``was_color`` (NA where the file could not be read).
    """
    rows = []
    for path in _expand_paths(paths):
        try:
            meta = read_xray(path).meta
        except XrayReadError as exc:
            rows.append({"path": _as_text(path), "ok": False, "reason": exc.reason, "format": None,
                         "bit_depth": pd.NA, "width": pd.NA, "height": pd.NA, "was_color": pd.NA})
            continue
        rows.append({"path": _as_text(path), "ok": True, "reason": "", "format": meta["format"],
                     "bit_depth": meta["bit_depth"], "width": meta["width"], "height": meta["height"],
                     "was_color": meta["was_color"]})
    table = pd.DataFrame(rows, columns=SCAN_COLUMNS)
    table["ok"] = table["ok"].astype(bool)
    for column in ("bit_depth", "width", "height"):
        table[column] = pd.array(table[column], dtype="Int64")
    table["was_color"] = pd.array(table["was_color"], dtype="boolean")
    return table


def check_readable(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> pd.DataFrame:
    """Like :func:`scan_files`, but raise one :class:`BadFilesError` listing ALL unreadable files."""
    table = scan_files(paths)
    bad = table[~table["ok"]]
    if len(bad):
        raise BadFilesError(list(zip(bad["path"], bad["reason"])), total=len(table))
    return table


def _expand_paths(paths) -> list:
    if paths is None:
        raise TypeError("scan_files() needs an iterable of file paths or a folder, not None")
    if isinstance(paths, (str, os.PathLike)):
        if Path(paths).is_dir():
            return sorted(str(p) for p in Path(paths).rglob("*") if not p.is_dir())
        return [paths]
    return list(paths)


def _as_text(path) -> str:
    return "" if path is None else (os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path))
