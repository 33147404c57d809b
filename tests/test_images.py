"""Tests for vitport.inputs: every file a user may hand in, good or bad, generated with PIL."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitport.errors import ImageError, UnreadableImageError
from vitport.inputs import (
    IMAGE_SUFFIXES,
    PROBLEM_CATEGORIES,
    ImageProblem,
    LoadedImage,
    find_images,
    random_images,
    read_image,
    read_images,
    sample_images,
    scan_images,
    skipped_summary,
    to_rgb,
)


def _save(image: Image.Image, path: Path, **params: object) -> Path:
    image.save(path, **params)
    return path


def _photo(width: int = 64, height: int = 48) -> Image.Image:
    """A smooth RGB gradient (compresses well, survives JPEG)."""
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None]
    pixels = np.stack(
        [np.broadcast_to(x, (height, width)), np.broadcast_to(y, (height, width)), (x + y) / 2],
        axis=-1,
    )
    return Image.fromarray(pixels.astype(np.uint8))


def _pixel(image: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return tuple(image.getpixel(xy))


# ------------------------------------------------------------------ orientation and modes


def test_exif_orientation_swaps_width_and_height(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(_photo(80, 40), tmp_path / "rotated.jpg", exif=exif.tobytes())
    with Image.open(path) as raw:
        assert raw.size == (80, 40)
    image = read_image(path)
    assert image.size == (40, 80)
    assert image.mode == "RGB"


def test_exif_orientation_applied_by_to_rgb() -> None:
    image = _photo(30, 10)
    image.getexif()[0x0112] = 8
    image.info["exif"] = image.getexif().tobytes()
    assert to_rgb(image).size == (10, 30)


def test_rgba_transparent_pixel_becomes_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 1), (255, 0, 0, 255))  # opaque red
    rgba.putpixel((2, 2), (0, 0, 0, 128))  # half transparent black
    image = read_image(_save(rgba, tmp_path / "alpha.png"))
    assert _pixel(image, (0, 0)) == (255, 255, 255)
    assert _pixel(image, (1, 1)) == (255, 0, 0)
    assert all(120 <= c <= 135 for c in _pixel(image, (2, 2)))


def test_palette_with_transparency_composited_on_white(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # 0: black, 1: blue
    palette.putpixel((3, 3), 1)
    path = _save(palette, tmp_path / "palette.png", transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    image = read_image(path)
    assert _pixel(image, (0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert _pixel(image, (3, 3)) == (0, 0, 255)


def test_gray_with_transparency_key_composited_on_white(tmp_path: Path) -> None:
    gray = Image.new("L", (3, 3), 0)
    gray.putpixel((1, 1), 200)
    image = read_image(_save(gray, tmp_path / "gray_trns.png", transparency=0))
    assert _pixel(image, (0, 0)) == (255, 255, 255)
    assert _pixel(image, (1, 1)) == (200, 200, 200)


def test_la_alpha_composited(tmp_path: Path) -> None:
    la = Image.new("LA", (3, 3), (0, 0))
    la.putpixel((1, 1), (90, 255))
    image = read_image(_save(la, tmp_path / "la.png"))
    assert _pixel(image, (0, 0)) == (255, 255, 255)
    assert _pixel(image, (1, 1)) == (90, 90, 90)


def test_cmyk_cyan_becomes_cyan(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    image = read_image(_save(cmyk, tmp_path / "cmyk.jpg", quality=95))
    red, green, blue = _pixel(image, (4, 4))
    assert red < 20 and green > 235 and blue > 235


def test_ycbcr_converted() -> None:
    ycbcr = Image.new("RGB", (2, 2), (255, 0, 0)).convert("YCbCr")
    red, green, blue = _pixel(to_rgb(ycbcr))
    assert red > 240 and green < 15 and blue < 15


def test_16bit_gray_scaled_by_bit_depth_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535, 255]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    image = read_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 0]


def test_16bit_big_endian_mode() -> None:
    values = np.array([[65535, 32768]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (2, 1), values.astype(">u2").tobytes())  # convert() clips
    assert big.mode == "I;16B"
    image = to_rgb(big)
    assert _pixel(image, (0, 0)) == (255, 255, 255)
    assert _pixel(image, (1, 0)) == (128, 128, 128)


def test_16bit_pgm_opened_as_mode_i(tmp_path: Path) -> None:
    values = np.array([[65535, 32768, 0]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.pgm")
    image = read_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [255, 128, 0]


def test_32bit_integer_outside_16bit_range_stretched() -> None:
    values = np.array([[-1000, 0, 1_000_000]], dtype=np.int32)
    image = to_rgb(Image.fromarray(values))
    assert image.getpixel((0, 0))[0] == 0 and image.getpixel((2, 0))[0] == 255


def test_bilevel_mode_1(tmp_path: Path) -> None:
    bilevel = Image.new("1", (4, 4), 0)
    bilevel.putpixel((2, 2), 1)
    image = read_image(_save(bilevel, tmp_path / "bits.bmp"))
    assert _pixel(image, (0, 0)) == (0, 0, 0)
    assert _pixel(image, (2, 2)) == (255, 255, 255)


def test_float_unit_range_scaled_by_255(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = _save(Image.fromarray(values), tmp_path / "float.tif")
    image = read_image(path)
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_outside_unit_range_min_max() -> None:
    values = np.array([[-2.0, 3.0, 8.0, np.nan]], dtype=np.float32)
    image = to_rgb(Image.fromarray(values))
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_multiframe_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 6), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    with Image.open(path) as raw:
        assert raw.n_frames == 2
        raw.seek(1)
        red, _, blue = _pixel(to_rgb(raw))  # to_rgb also rewinds an advanced image
        assert red > 240 and blue < 15
    red, _, blue = _pixel(read_image(path))
    assert red > 240 and blue < 15


def test_multipage_tiff_gives_first_page(tmp_path: Path) -> None:
    pages = [Image.new("L", (5, 5), 10), Image.new("L", (5, 5), 250)]
    path = tmp_path / "pages.tiff"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert _pixel(read_image(path)) == (10, 10, 10)


def test_to_rgb_returns_a_copy_for_rgb() -> None:
    original = _photo(8, 8)
    converted = to_rgb(original)
    assert converted is not original
    assert np.array_equal(np.asarray(converted), np.asarray(original))


# ------------------------------------------------------------------ bad files


def test_truncated_jpeg_reported_and_good_file_still_loaded(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    full = _save(noisy, tmp_path / "full.jpg")
    data = full.read_bytes()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data[: len(data) // 2])
    good = _save(_photo(), tmp_path / "good.png")
    loaded, problems = read_images([str(broken), str(good)])
    assert [item.name for item in loaded] == [str(good)]
    assert loaded[0].image.mode == "RGB"
    assert len(problems) == 1
    assert problems[0].name == str(broken)
    assert "truncated" in problems[0].reason and problems[0].category == "truncated"
    with pytest.raises(ImageError, match="broken.jpg: truncated"):
        read_image(broken)


def test_truncated_png_reported(tmp_path: Path) -> None:
    full = _save(_photo(120, 90), tmp_path / "full.png")
    data = full.read_bytes()
    broken = tmp_path / "broken.png"
    broken.write_bytes(data[: len(data) // 2])
    _, problems = read_images([broken])
    assert len(problems) == 1 and "truncated" in problems[0].reason
    assert problems[0].category == "truncated"


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.touch()
    loaded, problems = read_images([empty])
    assert loaded == []
    assert problems == [ImageProblem(name=str(empty), reason="empty file", category="empty")]


def test_text_file_named_jpg(tmp_path: Path) -> None:
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not a picture\n")
    _, problems = read_images([fake])
    assert problems[0].reason == "not an image (cannot identify format)"
    assert problems[0].category == "not-an-image"
    with pytest.raises(UnreadableImageError, match="notes.jpg: not an image") as caught:
        read_image(fake)
    assert (caught.value.reason, caught.value.category) == (problems[0].reason, "not-an-image")


def test_nonexistent_path_reported_not_dropped(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    assert find_images([missing]) == [missing]
    good = _save(_photo(), tmp_path / "good.png")
    loaded, problems = read_images([str(missing), good])
    assert len(loaded) == 1
    assert problems == [
        ImageProblem(name=str(missing), reason="file not found", category="missing")
    ]
    with pytest.raises(ImageError, match="file not found"):
        read_image(missing)


def test_directory_where_a_file_is_expected(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a directory"):
        read_image(tmp_path)


@pytest.mark.skipif(
    sys.platform == "win32" or (hasattr(os, "geteuid") and os.geteuid() == 0),
    reason="file permissions are not enforced here",
)
def test_unreadable_file(tmp_path: Path) -> None:
    locked = _save(_photo(), tmp_path / "locked.png")
    locked.chmod(0)
    try:
        _, problems = read_images([locked])
    finally:
        locked.chmod(0o644)
    assert problems[0].reason == "permission denied"


def test_decompression_bomb_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = _save(Image.new("RGB", (100, 100)), tmp_path / "bomb.png")  # 10000 pixels
    small = _save(Image.new("RGB", (10, 10)), tmp_path / "small.png")  # 100 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # > 2x limit: PIL raises the error
    loaded, problems = read_images([big, small])
    assert [item.name for item in loaded] == [str(small)]
    assert problems[0].name == str(big)
    assert problems[0].reason.startswith("decompression bomb: 10000 pixels exceeds the 1000 ")
    assert problems[0].category == "too-large"


def test_decompression_bomb_warning_range_also_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(Image.new("RGB", (40, 40)), tmp_path / "bomb.png")  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # between 1x and 2x: PIL only warns
    with pytest.raises(ImageError, match="decompression bomb: 1600 pixels"):
        read_image(path)


# ------------------------------------------------------------------ finding files


def test_find_images_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    root = tmp_path / "pics"
    (root / "b_dir" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for relative in ["b.PNG", "a.jpg", "b_dir/z.webp", "b_dir/deep/c.JPEG", "c.tif"]:
        _save(_photo(8, 8), root / relative)
    (root / "notes.txt").write_text("no")
    (root / "model.onnx").write_bytes(b"\0")
    (root / ".hidden" / "x.png").write_bytes(b"")
    (root / "._a.jpg").write_bytes(b"\0")  # macOS resource fork
    extra = _save(_photo(8, 8), tmp_path / "single.gif")
    found = find_images([str(extra), root])
    assert found == [
        extra,
        root / "a.jpg",
        root / "b.PNG",
        root / "b_dir" / "deep" / "c.JPEG",
        root / "b_dir" / "z.webp",
        root / "c.tif",
    ]
    loaded, problems = read_images([str(extra), root])
    assert [p.name for p in problems] == [str(root / "model.onnx"), str(root / "notes.txt")]
    assert [item.name for item in loaded] == [str(path) for path in found]
    assert all(item.image.mode == "RGB" for item in loaded)


def test_file_given_directly_kept_whatever_its_suffix(tmp_path: Path) -> None:
    odd = _save(_photo(), tmp_path / "photo.data", format="PNG")
    assert find_images([odd]) == [odd]
    loaded, problems = read_images([odd])
    assert len(loaded) == 1 and problems == []


def test_single_path_not_iterated_as_characters(tmp_path: Path) -> None:
    path = _save(_photo(), tmp_path / "one.png")
    assert find_images(str(path)) == [path]  # type: ignore[arg-type]


def test_image_suffixes_are_lower_case_with_dot() -> None:
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"} <= IMAGE_SUFFIXES
    assert all(suffix.startswith(".") and suffix == suffix.lower() for suffix in IMAGE_SUFFIXES)


def test_no_images_found_names_what_was_skipped_and_the_suffixes(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(ImageError) as caught:
        read_images([tmp_path])
    message = str(caught.value)
    assert f"no images found in {tmp_path} (2 other files skipped: " in message
    assert "meta.json" in message and "readme.txt" in message
    assert "\n" not in message and all(suffix in message for suffix in IMAGE_SUFFIXES)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(ImageError, match=r"\(1 other file skipped: "):
        read_images([tmp_path])
    with pytest.raises(ImageError, match="no images found"):
        read_images([])


def test_non_image_files_in_a_directory_are_counted_not_dropped(tmp_path: Path) -> None:
    good = _save(_photo(), tmp_path / "good.png")
    (tmp_path / "ok").write_text("no suffix")
    (tmp_path / "notes.txt").write_text("text")
    (tmp_path / ".hidden.txt").write_text("hidden entries stay ignored")
    paths, problems = scan_images([tmp_path])
    assert paths == [good]
    assert [p.name for p in problems] == [str(tmp_path / "notes.txt"), str(tmp_path / "ok")]
    assert {p.category for p in problems} == {"not-an-image"}
    loaded, read_problems = read_images([tmp_path])
    assert len(loaded) == 1 and read_problems == problems
    assert skipped_summary(problems) == "2 skipped (not-an-image 2)"
    assert skipped_summary([]) == ""


def test_every_problem_carries_a_known_category_set_where_it_was_found(tmp_path: Path) -> None:
    (tmp_path / "empty.png").touch()
    (tmp_path / "notes.jpg").write_text("text")
    (tmp_path / "readme.txt").write_text("text")
    (tmp_path / "cut.png").write_bytes(_save(_photo(), tmp_path / "whole.png").read_bytes()[:200])
    _, problems = read_images([tmp_path, tmp_path / "gone.png"])
    found = {Path(p.name).name: p.category for p in problems}
    assert found == {
        "empty.png": "empty",
        "notes.jpg": "not-an-image",
        "readme.txt": "not-an-image",
        "cut.png": "truncated",
        "gone.png": "missing",
    }
    assert set(found.values()) <= set(PROBLEM_CATEGORIES)


def test_scan_refuses_only_missing_files_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=f"^file not found: {missing}; check the path$"):
        scan_images([missing])
    good = _save(_photo(), tmp_path / "good.png")
    paths, problems = scan_images([missing, good])
    assert paths == [good] and problems == [ImageProblem(str(missing), "file not found", "missing")]


# ------------------------------------------------------------------ built-in inputs


def test_sample_images_are_distinct_real_photos() -> None:
    samples = sample_images(8)
    assert len(samples) == 8
    names = [sample.name for sample in samples]
    assert len(set(names)) == 8
    assert all(name.startswith("skimage:") for name in names)
    assert names[0] == "skimage:astronaut"
    digests = set()
    for sample in samples:
        assert isinstance(sample, LoadedImage)
        assert sample.image.mode == "RGB"
        assert min(sample.image.size) >= 128
        pixels = np.asarray(sample.image)
        assert pixels.std() > 10  # a photo, not a flat image
        digests.add(pixels.tobytes()[:4096])
    assert len(digests) == 8
    assert [sample.name for sample in sample_images(3)] == names[:3]  # deterministic order


def test_sample_images_too_many_raises() -> None:
    with pytest.raises(ImageError, match="sample images"):
        sample_images(1000)


def test_random_images_reproducible() -> None:
    first = random_images(3, size=32, seed=7)
    again = random_images(3, size=32, seed=7)
    other = random_images(3, size=32, seed=8)
    assert [item.name for item in first] == ["random:7:0:32", "random:7:1:32", "random:7:2:32"]
    for a, b, c in zip(first, again, other, strict=True):
        assert a.image.mode == "RGB" and a.image.size == (32, 32)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    assert not np.array_equal(np.asarray(first[0].image), np.asarray(first[1].image))
    pixels = np.asarray(first[0].image)
    assert pixels.min() < 10 and pixels.max() > 245  # uniform noise over the full range


def test_random_images_default_size_and_prefix_stable() -> None:
    images = random_images(2)
    assert images[0].image.size == (224, 224)
    assert np.array_equal(np.asarray(random_images(1)[0].image), np.asarray(images[0].image))


def test_permission_error_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(_photo(), tmp_path / "locked.png")

    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)
    _, problems = read_images([path])
    assert problems == [
        ImageProblem(name=str(path), reason="permission denied", category="unreadable")
    ]
