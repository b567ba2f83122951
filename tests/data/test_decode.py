"""One decode path: JPEGs reduced at decode (DCT scaling) never below the resize target, and the same bytes give
the same uint8 pixels through training, the bundle's loader and the server's request decoder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from roadwork.data.features import FEATURE_SPEC
from roadwork.data.preprocess import (
    ImageTooLarge,
    PreprocessSpec,
    decode_side,
    load_for,
    load_resized,
    load_rgb,
    preprocess,
    resize_uint8,
    to_float,
)
from roadwork.serve.decode import RequestError, decode_image

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real-roadwork-mini"


def _photo(w: int, h: int) -> Image.Image:
    """A real photo from the shared folder upscaled to w x h (texture, edges, JPEG history), else a synthetic
    scene with gradients, noise and hard edges."""
    files = sorted((REAL / "roadwork").glob("*.jpg"))[:1] if REAL.is_dir() else []
    if files:
        return Image.open(files[0]).convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.int16)
    a += rng.integers(-20, 21, a.shape, dtype=np.int16)
    a[h // 3 : h // 2, w // 4 : w // 3] = (255, 120, 0)  # an orange block: hard edges
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("decode")
    out = {}
    for name, (w, h) in {"1080p": (1920, 1080), "portrait": (601, 1003), "small": (128, 128)}.items():
        im = _photo(w, h)
        out[f"{name}.jpg"] = d / f"{name}.jpg"
        im.save(out[f"{name}.jpg"], quality=90)
        out[f"{name}.png"] = d / f"{name}.png"
        im.save(out[f"{name}.png"])
    gray = d / "gray.jpg"
    _photo(800, 600).convert("L").save(gray, quality=90)
    out["gray.jpg"] = gray
    return out


@pytest.mark.parametrize(
    ("size", "min_side", "expected"),
    [
        ((1920, 1080), 96, (240, 135)),  # 1/8: 135 >= 96
        ((1920, 1080), 135, (240, 135)),  # exactly the target: still 1/8
        ((1920, 1080), 136, (480, 270)),  # one more pixel: 1/4
        ((1920, 1080), 256, (480, 270)),  # 224 at crop_pct 0.875
        ((1920, 1080), 540, (960, 540)),
        ((1920, 1080), 541, (1920, 1080)),
        ((601, 1003), 150, (151, 251)),  # odd sizes round up: ceil(601 / 4)
        ((128, 128), 96, (128, 128)),  # 64 < 96: no reduction
    ],
)
def test_jpeg_is_reduced_to_the_smallest_dct_scale_not_below_the_target(
    tmp_path: Path, size: tuple[int, int], min_side: int, expected: tuple[int, int]
) -> None:
    p = tmp_path / "x.jpg"
    Image.new("RGB", size, (10, 200, 30)).save(p, quality=90)
    im = load_rgb(p, min_side)
    assert im.mode == "RGB" and im.size == expected
    assert min(im.size) >= min_side or im.size == size


def test_the_draft_never_goes_below_the_resize_target_with_a_crop_pct() -> None:
    spec = PreprocessSpec(size=224, crop_pct=0.875)
    assert spec.resize_side == 256 and decode_side(spec) == 256
    buf = io.BytesIO()
    Image.new("RGB", (1920, 1080)).save(buf, "JPEG")
    assert min(load_rgb(buf.getvalue(), decode_side(spec)).size) == 270  # 1/4; 1/8 (135) would be below 256


def test_decode_side_is_the_largest_consumer() -> None:
    model, small = PreprocessSpec(size=96), PreprocessSpec(size=48)
    assert decode_side(small) == 48
    assert decode_side(model, small, FEATURE_SPEC) == 96
    with pytest.raises(ValueError, match="at least one"):
        decode_side()


def test_png_and_grayscale_keep_their_path(files: dict[str, Path]) -> None:
    full = load_rgb(files["1080p.png"])
    assert load_rgb(files["1080p.png"], 96).size == full.size == (1920, 1080)
    np.testing.assert_array_equal(np.asarray(load_rgb(files["1080p.png"], 96)), np.asarray(full))
    g = load_rgb(files["gray.jpg"], 96)
    assert g.mode == "RGB" and g.size == (200, 150)  # a grayscale JPEG is DCT-scaled too, then made RGB


@pytest.mark.parametrize("name", ["1080p.jpg", "portrait.jpg", "small.jpg", "1080p.png", "small.png"])
@pytest.mark.parametrize("spec", [PreprocessSpec(size=96), PreprocessSpec(size=224, crop_pct=0.875)])
def test_training_bundle_and_server_give_bit_identical_pixels(
    files: dict[str, Path], name: str, spec: PreprocessSpec
) -> None:
    from roadwork.training.loop import load_uint8

    path = files[name]
    train = load_uint8([str(path)], spec, progress=False)[0]
    bundle = resize_uint8(load_for(path, spec), spec)
    server_im = decode_image(path.read_bytes(), max_pixels=10**8, min_side=decode_side(spec))
    server = resize_uint8(server_im, spec)
    assert train.shape == (spec.size, spec.size, 3)
    np.testing.assert_array_equal(train, bundle)
    np.testing.assert_array_equal(train, server)
    # and the network input: the float tensors of every path are the same bits
    np.testing.assert_array_equal(preprocess([server_im], spec)[0], to_float(train[None], spec)[0])


def test_cascade_consumers_share_one_decode(files: dict[str, Path]) -> None:
    """A small net trained with the cascade's decode side sees what the server (decoding once, for the model)
    hands it."""
    from roadwork.training.loop import load_uint8

    model, small = PreprocessSpec(size=96), PreprocessSpec(size=48)
    side = decode_side(model, small, FEATURE_SPEC)
    path = files["small.jpg"]  # 128 px: the model needs 1/1, the small net alone would take 1/2
    served = decode_image(path.read_bytes(), max_pixels=10**8, min_side=side)
    trained = load_uint8([str(path)], small, progress=False, min_side=side)[0]
    np.testing.assert_array_equal(trained, resize_uint8(served, small))
    alone = load_uint8([str(path)], small, progress=False)[0]
    assert load_rgb(path, decode_side(small)).size == (64, 64)
    assert not np.array_equal(alone, trained)  # why the decode side must be shared, not per stage


def test_dct_scaled_pixels_stay_close_to_the_full_decode(files: dict[str, Path]) -> None:
    """Reducing at decode changes pixels a little, not the picture: mean |difference| under 2 levels of 255."""
    for spec in (PreprocessSpec(size=96), PreprocessSpec(size=224, crop_pct=0.875)):
        new = load_resized(files["1080p.jpg"], spec).astype(np.int16)
        old = resize_uint8(load_rgb(files["1080p.jpg"]), spec).astype(np.int16)
        diff = np.abs(new - old)
        assert 0 < diff.mean() < 2.0, diff.mean()


def test_the_header_is_checked_before_decoding(tmp_path: Path) -> None:
    p = tmp_path / "big.jpg"
    Image.new("RGB", (3000, 2000)).save(p, quality=50)
    with pytest.raises(ImageTooLarge, match=r"3000x2000 = 6000000 pixels, over the limit of 5000000"):
        load_rgb(p, 96, max_pixels=5_000_000)
    with pytest.raises(RequestError, match="over the limit of 5000000") as e:
        decode_image(p.read_bytes(), max_pixels=5_000_000, min_side=96)
    assert e.value.status == 400
    assert load_rgb(p, 96, max_pixels=6_000_000).size == (375, 250)


@pytest.mark.parametrize("size", [(1920, 1080), (601, 1003), (128, 128), (95, 400)])
@pytest.mark.parametrize("min_side", [48, 96, 256])
def test_decoded_size_predicts_the_decode_from_the_header(
    tmp_path: Path, size: tuple[int, int], min_side: int
) -> None:
    from roadwork.data.preprocess import decoded_size

    jpg, png = tmp_path / "x.jpg", tmp_path / "x.png"
    Image.new("RGB", size, (1, 2, 3)).save(jpg)
    Image.new("RGB", size, (1, 2, 3)).save(png)
    assert decoded_size(size, "JPEG", min_side) == load_rgb(jpg, min_side).size
    assert decoded_size(size, "PNG", min_side) == load_rgb(png, min_side).size == size


def _wide_versions(d: Path) -> tuple[Path, dict[str, Path]]:
    """One greyscale photo as 8-bit PNG, and as 16-bit PNG/TIFF (little- and big-endian), 16-bit PGM (PIL mode
    ``I``) and float TIFF in [0, 1]: what a camera pipeline or a scientific tool writes for the same picture."""
    g8 = np.asarray(_photo(320, 240).convert("L"))
    eight = d / "g8.png"
    Image.fromarray(g8).save(eight)
    g16 = g8.astype(np.uint16) * 257  # 8 -> 16 bit as every tool scales it (0 -> 0, 255 -> 65535)
    wide = {"I;16.png": d / "g16.png", "I;16.tif": d / "g16.tif", "I;16B.tif": d / "g16b.tif"}
    Image.fromarray(g16).save(wide["I;16.png"])
    Image.fromarray(g16).save(wide["I;16.tif"])
    Image.fromarray(g16.astype(">u2")).save(wide["I;16B.tif"])
    wide["I.pgm"] = d / "g16.pgm"
    Image.fromarray(g16).save(wide["I.pgm"])
    wide["F.tif"] = d / "f.tif"
    Image.fromarray(g8.astype(np.float32) / 255).save(wide["F.tif"])
    return eight, wide


def test_16_bit_and_float_greyscale_decode_like_the_8_bit_version(tmp_path: Path) -> None:
    """PIL's convert("RGB") clips 16-bit values to 255 (a 16-bit photo came out ~99 % white, and was predicted on
    that); the shared decode keeps the top 8 bits, so the 16-bit file gives the 8-bit file's pixels exactly."""
    eight, wide = _wide_versions(tmp_path)
    ref = np.asarray(load_rgb(eight))
    assert 40 < ref.mean() < 215  # a photo, not a white or black page
    spec = PreprocessSpec(size=96)
    for name, path in wide.items():
        with Image.open(path) as im:
            assert im.mode == name.split(".")[0]  # each of PIL's wide modes is covered
        np.testing.assert_array_equal(np.asarray(load_rgb(path)), ref, err_msg=name)
        np.testing.assert_array_equal(load_resized(path, spec), load_resized(eight, spec), err_msg=name)
    with Image.open(wide["I;16.png"]) as im:  # a PIL image handed to preprocess (the Python API) too
        np.testing.assert_array_equal(preprocess([im], spec), preprocess([Image.open(eight)], spec))


def test_wide_images_without_a_defined_brightness_are_refused_clearly(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match=r"values from 200 to 200: only \[0, 1\] has a defined brightness"):
        load_rgb(tmp_path / "f.tif")
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(ValueError, match=r"values from 70000 to 70000: only 0..65535 \(16 bit\) is read"):
        load_rgb(tmp_path / "i.tif")


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "CMYK", "1"])
def test_8_bit_images_decode_exactly_as_before(tmp_path: Path, mode: str) -> None:
    """Every 8-bit mode gives PIL's own conversion, bit for bit (an RGB image is not converted at all): the pixels
    the certified bundles were evaluated on do not move."""
    im = _photo(160, 120).convert(mode)
    for fmt in ("png", "jpg", "tif"):
        if (fmt == "jpg" and mode not in ("RGB", "L", "CMYK")) or (fmt == "png" and mode == "CMYK"):
            continue  # what the format cannot hold
        p = tmp_path / f"x.{fmt}"
        im.save(p)
        with Image.open(p) as ref:
            expected = np.asarray(ref.convert("RGB"))
        np.testing.assert_array_equal(np.asarray(load_rgb(p)), expected, err_msg=f"{mode} {fmt}")
        with Image.open(p) as ref:  # and with the DCT-scaled decode of a JPEG
            ref.draft("RGB", (60, 60))
            expected = np.asarray(ref.convert("RGB"))
        np.testing.assert_array_equal(np.asarray(load_rgb(p, 60)), expected, err_msg=f"{mode} {fmt} at 60")
