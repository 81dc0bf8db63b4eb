"""The one image loader: any Pillow format to RGB with EXIF orientation, or a reason why not."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from . import guards

log = logging.getLogger(__name__)


class ImageLoadError(Exception):
    """An image could not be decoded; ``str(exc)`` is the reason recorded in the cache."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, keeping 16-bit and float images' contrast."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if img.mode.startswith("I;16") else (float(arr.min()), float(arr.max()))
        if img.mode == "I" and hi <= 65535 and lo >= 0:
            lo, hi = 0.0, 65535.0 if hi > 255 else 255.0
        scale = (hi - lo) or 1.0
        arr8 = np.clip((arr - lo) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode in ("P", "PA") and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def _reason(text: str, path: str | os.PathLike) -> str:
    """A failure reason without the file's own path (recorded beside it anyway) that is valid UTF-8.

    Pillow and the OS put the path into their messages; a non-UTF-8 file name would then make
    the reason unstorable in the cache's UTF-8 ``failed/reasons``.
    """
    p = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""  # "" for in-memory bytes
    for form in (repr(p), p) if len(p) >= 4 else ():
        text = text.replace(f": {form}", "").replace(form, "")
    text = " ".join(text.replace(" :", ":").split()).rstrip(": ")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _missing_reason(path: str | os.PathLike) -> str:
    if os.path.islink(path):
        return f"broken symlink (target {os.fsdecode(os.readlink(path))!r} does not exist)"
    return "file not found (removed while running?)"


def load_image(path: str | os.PathLike | io.BytesIO, *, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` (or the bytes of a remote object) to an RGB image (first frame, EXIF-rotated).

    ``draft_size`` lets the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding when the
    image is at least twice that size, which makes CPU decoding of large photos several
    times faster; the result is still at least ``draft_size`` on its short side.

    Raises :class:`ImageLoadError` (never anything else) with a short reason for any file that
    cannot be used: empty, truncated, not an image, too large, unreadable, broken link, ...
    """
    why = guards.file_reason(path) if not isinstance(path, io.BytesIO) else ""  # a FIFO would block the open forever
    if why:
        raise ImageLoadError(why)
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            src = path if isinstance(path, io.BytesIO) else stack.enter_context(guards.open_regular(path))
            with Image.open(src) as im:
                why = guards.size_reason(im.size)  # from the header, before any pixel is decoded
                if why:
                    raise ImageLoadError(why)
                if draft_size and im.format == "JPEG":
                    # Keep the short side >= 2 * draft_size so the final antialiased resize still
                    # does at least 2x: features stay within cosine 0.999 of a full decode.
                    w, h = im.size
                    scale = min(w, h) / (2.0 * draft_size)
                    if scale >= 2:
                        im.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
                im.seek(0)
                im.load()
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception as exc:  # noqa: BLE001 - a damaged EXIF block must not lose the image
                    log.debug("ignoring unreadable EXIF orientation of %s: %s", path, exc)
                return _to_rgb(im)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(_reason(f"image too large (decompression-bomb limit): {exc}", path)) from None
    except FileNotFoundError:
        raise ImageLoadError(_missing_reason(path)) from None
    except PermissionError:
        raise ImageLoadError("permission denied (cannot read the file)") from None
    except IsADirectoryError:
        raise ImageLoadError("is a directory") from None
    except guards.IrregularFileError as exc:  # replaced by a FIFO or device after the check above
        raise ImageLoadError(str(exc)) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageLoadError("symlink loop (too many levels of symbolic links)") from None
        if exc.errno is not None and exc.strerror:  # an OS-level read error (EIO, ...)
            raise ImageLoadError(f"cannot read: {exc.strerror}") from None
        try:
            empty = os.path.getsize(path) == 0
        except (OSError, TypeError):  # TypeError: in-memory bytes (featx.data.sources), never empty here
            empty = False
        if empty:
            raise ImageLoadError("empty file (0 bytes)") from None
        msg = str(exc)
        if "cannot identify image file" in msg:
            raise ImageLoadError("not an image Pillow can decode") from None
        if "truncated" in msg.lower():
            raise ImageLoadError(_reason(f"truncated image: {msg}", path)) from None
        raise ImageLoadError(_reason(f"cannot decode: {msg}", path)) from None
    except MemoryError:
        raise ImageLoadError("out of memory while decoding") from None
    except Exception as exc:  # noqa: BLE001 - plugin bugs (struct.error, IndexError, ...) on odd files
        raise ImageLoadError(_reason(f"cannot decode: {type(exc).__name__}: {exc}", path)) from None


def load_or_blank(path: str, transform, *, crop: int, draft_size: int | None):
    """(transformed image, "") or (zero image, reason): a bad file must never stop a long run.

    The one place an image becomes a network input or a recorded failure reason: the CPU
    engine, the GPU engine's CPU fallbacks and the extractor all call it.
    """
    import torch  # heavy: only the engines call this, and they have loaded torch already

    try:
        return transform(load_image(path, draft_size=draft_size)), ""
    except ImageLoadError as exc:
        err = str(exc)
    except Exception as exc:  # noqa: BLE001 - anything a decoder or transform raises
        err = f"{type(exc).__name__}: {exc}"
    return torch.zeros(3, crop, crop), err
