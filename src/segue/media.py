"""Image input and video output.

Inputs: paths, PIL images or numpy uint8 [H, W, 3] arrays, in any common mode (RGBA, grey, palette, 16-bit),
become upright (EXIF orientation) 8-bit RGB, with errors that name the file. Outputs: mp4 (H.264), webm (VP9),
gif and PNG frame folders, always written under a temporary name and renamed when whole, so a crash never leaves
half a file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

VIDEO_FORMATS = {".mp4": ("mp4", "libx264"), ".webm": ("webm", "libvpx-vp9"), ".gif": ("gif", "gif")}


def load_image(image: str | os.PathLike[str] | Image.Image | np.ndarray, what: str = "image") -> Image.Image:
    """Open ``image`` (a file path, a PIL image or a numpy uint8 [H, W, 3] RGB array) and return it as 8-bit
    RGB, turned upright by its EXIF orientation; ``what`` names it in errors ("first frame")."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(
                f"{what}: a numpy image must be a uint8 [H, W, 3] RGB array, got {image.dtype} {list(image.shape)}"
            )
        return to_rgb(Image.fromarray(np.ascontiguousarray(image), "RGB"), what)
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image), what)
    if not isinstance(image, str | os.PathLike) or not str(image):
        raise InputError(
            f"{what} must be an image file path, a PIL image or a numpy uint8 [H, W, 3] array, got {image!r:.60}"
        )
    path = Path(image)
    if not path.exists():
        raise InputError(f"{what}: file not found: {path}")
    if not path.is_file():
        raise InputError(f"{what}: not a file: {path}")
    try:
        with warnings.catch_warnings():
            # over Image.MAX_IMAGE_PIXELS: refused (PIL only warns up to twice the limit)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(ImageOps.exif_transpose(im), f"{what} ({path})")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{what}: {path} has more pixels than the {Image.MAX_IMAGE_PIXELS} allowed (a decompression bomb?); "
            "scale it down first"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what}: cannot read {path} as an image ({e})") from None


def to_rgb(im: Image.Image, what: str = "image") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. Alpha is dropped (as the reference's ``convert('RGB')``);
    16-bit and float grey are rescaled to 8 bits instead of being clipped."""
    if im.width < 1 or im.height < 1:
        raise InputError(f"{what}: empty image ({im.width}x{im.height})")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def _default_mode(base: int) -> int:
    """``base`` under the process umask: what open() or mkdir() would have given (mkstemp and mkdtemp
    make private 0600 / 0700 entries, which other users and web servers could not read)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` (same extension); rename it to ``dest`` on success."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.stem}.", suffix=f".part{dest.suffix}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _default_mode(0o666))
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_video_path(path: str | os.PathLike[str]) -> Path:
    """Validate an output path before any work is done (extension known, folder writable)."""
    p = Path(path)
    if p.suffix.lower() not in VIDEO_FORMATS:
        raise InputError(
            f"output {p}: unknown extension {p.suffix or '(none)'!r}; use one of {', '.join(VIDEO_FORMATS)}"
        )
    if p.exists() and p.is_dir():
        raise InputError(f"output {p} is a folder; give a file name such as {p / 'video.mp4'}")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise InputError(f"output folder {parent} is not writable")
    return p


def write_video(frames: np.ndarray, path: str | os.PathLike[str], fps: int) -> Path:
    """Write uint8 frames [T, H, W, 3] to ``path`` (format from the extension), atomically."""
    dest = check_video_path(path)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    fmt, codec = VIDEO_FORMATS[dest.suffix.lower()]
    with atomic_path(dest) as tmp:
        if fmt == "gif":
            _write_gif(frames, tmp, fps)
        else:
            _write_av(frames, tmp, fmt, codec, fps)
    return dest


def _write_av(frames: np.ndarray, path: Path, fmt: str, codec: str, fps: int) -> None:
    import av

    _, h, w, _ = frames.shape
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        # High quality by default: users post-process these clips (crf 17 is visually lossless for x264).
        # No B-frames: x264's adaptive B-frame decision gave different bytes (and pixels) for the same frames
        # from run to run, at 64x64 and at 832x480 alike; without B-frames the same frames give the same file.
        x264 = {"crf": "17", "x264-params": "bframes=0"}
        stream.options = x264 if codec == "libx264" else {"crf": "20", "b": "0"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gif(frames: np.ndarray, path: Path, fps: int) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def write_frames(frames: np.ndarray, folder: str | os.PathLike[str]) -> Path:
    """Write lossless PNG frames 00000.png, 00001.png, ... into ``folder``; each file appears whole."""
    dest = Path(folder)
    if dest.exists() and not dest.is_dir():
        raise InputError(f"frames folder {dest} exists and is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        for i, f in enumerate(frames):
            Image.fromarray(f).save(staging / f"{i:05d}.png", format="PNG")
        if not dest.exists():
            os.chmod(staging, _default_mode(0o777))
            os.replace(staging, dest)
        else:
            for file in sorted(staging.iterdir()):
                os.replace(file, dest / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a video file to uint8 [T, H, W, 3] (used by tests and evaluation)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
