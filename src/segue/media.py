"""Image input and video output.

Inputs: paths, PIL images or numpy uint8 [H, W, 3] arrays, in any common mode (RGBA, grey, palette, 16-bit),
become upright (EXIF orientation) 8-bit RGB, with errors that name the file. Outputs: mp4 (H.264), webm (VP9),
gif and PNG frame folders, checked and written through segue.io: never onto an input, under a temporary name
renamed (or a folder swapped in) when whole, so a crash, a full disk or a signal never leaves half a file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .io import Protected, atomic_folder, atomic_path, check_output_file, check_output_folder

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


def check_video_path(path: str | os.PathLike[str], protected: Protected | None = None) -> Path:
    """Validate a video output path before any work is done (extension known, folder writable or
    creatable, not an input; see segue.io)."""
    return check_output_file(path, "output", protected, VIDEO_FORMATS)


def check_outputs(
    video: str | os.PathLike[str],
    frames_dir: str | os.PathLike[str] | None = None,
    latent: str | os.PathLike[str] | None = None,
    protected: Protected | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path | None, Path | None]:
    """Check a generation's outputs together before any work: each one alone (see segue.io), then that no
    two are the same file and that no file lies inside the frames folder, which is replaced whole."""
    out = check_video_path(video, protected)
    frames = None if frames_dir is None else check_output_folder(frames_dir, "frames folder", protected, overwrite)
    lat = None if latent is None else check_output_file(latent, "latent file", protected)
    if lat is not None and lat.resolve() == out.resolve():
        raise InputError(f"latent file {lat} is the video output too; give them different names")
    if frames is not None:
        root = frames.resolve()
        for what, p in (("output", out), ("latent file", lat)):
            if p is not None and p.resolve().is_relative_to(root):
                raise InputError(f"{what} {p} is inside the frames folder {frames}, which is replaced whole")
    return out, frames, lat


def write_video(frames: np.ndarray, path: str | os.PathLike[str], fps: int, protected: Protected | None = None) -> Path:
    """Write uint8 frames [T, H, W, 3] to ``path`` (format from the extension), atomically."""
    dest = check_video_path(path, protected)
    with atomic_path(dest) as tmp:
        write_video_file(frames, tmp, dest, fps)
    return dest


def write_video_file(frames: np.ndarray, path: Path, dest: Path, fps: int) -> None:
    """Encode uint8 frames [T, H, W, 3] into ``path`` in the format of ``dest``'s extension (not atomic:
    ``path`` is a temporary name from segue.io)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    fmt, codec = VIDEO_FORMATS[dest.suffix.lower()]
    if fmt == "gif":
        _write_gif(frames, path, fps)
    else:
        _write_av(frames, path, fmt, codec, fps)


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


def gif_durations(frames: int, fps: int) -> list[int]:
    """Per-frame GIF durations in ms. GIF stores hundredths of a second: 8 fps is 12.5 cs a frame, which one
    fixed duration rounds to 12 (8.33 fps); alternating 13 and 12 keeps frame i starting at i/fps (to 10 ms)."""
    ends = [round((i + 1) * 100 / fps) for i in range(frames)]  # in cs
    return [10 * (e - s) for s, e in zip([0, *ends[:-1]], ends, strict=True)]


def _write_gif(frames: np.ndarray, path: Path, fps: int) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], duration=gif_durations(len(images), fps), loop=0
    )


def write_frames(
    frames: np.ndarray, folder: str | os.PathLike[str], protected: Protected | None = None, overwrite: bool = False
) -> Path:
    """Write lossless PNG frames 00000.png, 00001.png, ... as a new folder swapped in whole for ``folder``
    (refused when ``folder`` holds files segue did not write, unless ``overwrite``; see segue.io)."""
    dest = check_output_folder(folder, "frames folder", protected, overwrite)
    with atomic_folder(dest, overwrite) as staging:
        write_png_frames(frames, staging)
    return dest


def write_png_frames(frames: np.ndarray, folder: Path) -> None:
    """PNG frames 00000.png, 00001.png, ... into ``folder`` (not atomic: a staging folder from segue.io)."""
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:05d}.png", format="PNG")


def read_video(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a video file to uint8 [T, H, W, 3] (used by tests and evaluation)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
