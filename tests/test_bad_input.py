"""Bad input and faults (issue 17): each case gets a message naming the file or flag, or is handled correctly.

Grouped by kind: data (images and annotation files), flags, checkpoints, faults (full disk, interrupts).
Through ``main.cli()`` a mistake exits with one line on stderr and no traceback: status 2 for flags, 1 for
data and files. Tiny CPU runs on tiny data under tmp_path; one trained run is shared by the checkpoint tests.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import sys

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

import main as train_main
from datasets.coco import AnnotationError, CocoDetection, NoReadableImageError, to_rgb
from flags import FlagError, finalize_args, get_args_parser
from tests.conftest import synthetic_flags
from util import checkpoint
from util.checkpoint import CheckpointError, DiskFullError, link_atomic, load_checkpoint, save_atomic

TINY_COCO = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers",
             "2", "--dim_feedforward", "64", "--num_queries", "8", "--device", "cpu", "--batch_size", "2",
             "--num_workers", "0", "--max_iters_per_epoch", "2", "--epochs", "1", "--backbone_from_scratch"]


def _args(flags):
    return finalize_args(get_args_parser().parse_args(flags))


def _cli(monkeypatch, capsys, flags):
    """Run main.cli() with ``flags``; returns (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["main.py", *flags])
    with pytest.raises(SystemExit) as info:
        train_main.cli()
    return info.value.code, capsys.readouterr().err


def _assert_one_line(err, *needles):
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line, err
    for needle in needles:
        assert needle in line, (needle, line)


def _epochs(out):
    return [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]


def _write_coco(root, images, anns, categories=(1, 2, 3, 4, 5)):
    """images: [(file_name, PIL image or None (already written), entry extras)]; returns the annotation file."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, img, extra) in enumerate(images, start=1):
        if img is not None:
            img.save(root / "img" / name)
        entries.append({"id": i, "file_name": name, **extra})
    data = {"images": entries, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"


def _rgb(w, h, seed=0):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _ann(ann_id, image_id, bbox, category_id=1):
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": category_id, "area": 1.0, "iscrowd": 0}


def _coco_flags(ann_file, out, *extra):
    folder = str(ann_file.parent / "img")
    return TINY_COCO + ["--train_img_folder", folder, "--train_ann_file", str(ann_file), "--val_img_folder", folder,
                        "--val_ann_file", str(ann_file), "--output_dir", str(out), *extra]


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
def test_16bit_png_is_scaled_not_white(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    ann_file = _write_coco(tmp_path, [("a.png", PIL.Image.fromarray(ramp), {"width": 40, "height": 30})],
                           [_ann(1, 1, [2, 2, 10, 10])])
    image, _ = CocoDetection(tmp_path / "img", ann_file)[0]
    pixels = np.asarray(image)
    assert PIL.Image.open(tmp_path / "img" / "a.png").mode == "I;16"
    np.testing.assert_allclose(pixels[..., 0], np.round(ramp / 257.0), atol=1)  # not clipped to 255
    assert 100 < pixels.mean() < 155


@pytest.mark.parametrize("mode,values,expected", [("F", 0.5, 128), ("F", 300.0, 255), ("I", 40000, 156),
                                                  ("I", 200, 200), ("L", 7, 7)])
def test_other_grey_depths_are_scaled(mode, values, expected):
    dtype = {"F": np.float32, "I": np.int32, "L": np.uint8}[mode]
    img = PIL.Image.fromarray(np.full((4, 4), values, dtype=dtype))
    assert img.mode == mode
    assert np.asarray(to_rgb(img))[0, 0].tolist() == [expected] * 3


def _exif_jpeg(path, orientation):
    """A JPEG stored 80 wide x 64 high whose EXIF orientation shows it 64 x 80 (6: rotate 90 degrees clockwise)."""
    stored = _rgb(80, 64)
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, quality=95)


def test_exif_rotated_jpeg_reads_as_shown_with_its_box(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    _exif_jpeg(tmp_path / "img" / "r.jpg", 6)
    ann_file = _write_coco(tmp_path, [("r.jpg", None, {"width": 64, "height": 80})], [_ann(1, 1, [4, 50, 20, 25])])
    official = CocoDetection(tmp_path / "img", ann_file)  # official: the stored pixels, EXIF ignored
    assert official[0][0].size == (80, 64)
    with caplog.at_level(logging.INFO, logger="datasets.coco"):
        ds = CocoDetection(tmp_path / "img", ann_file, exif_orientation=True)
    image, target = ds[0]
    shown = PIL.ImageOps.exif_transpose(PIL.Image.open(tmp_path / "img" / "r.jpg")).convert("RGB")
    assert image.size == (64, 80) and np.array_equal(np.asarray(image), np.asarray(shown))
    assert target["boxes"].tolist() == [[4.0, 50.0, 24.0, 75.0]]  # kept, in the shown frame
    assert "EXIF orientation are read rotated" in caplog.text


def test_exif_rotated_jpeg_annotated_on_stored_pixels_stays_unrotated(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    _exif_jpeg(tmp_path / "img" / "r.jpg", 6)
    ann_file = _write_coco(tmp_path, [("r.jpg", None, {"width": 80, "height": 64})], [_ann(1, 1, [50, 4, 25, 20])])
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        ds = CocoDetection(tmp_path / "img", ann_file, exif_orientation=True)
    image, target = ds[0]
    assert image.size == (80, 64) and target["boxes"].tolist() == [[50.0, 4.0, 75.0, 24.0]]
    assert "stored pixels" in caplog.text and "r.jpg" in caplog.text


def test_size_mismatch_is_counted_and_the_log_tells_what_reaches_the_targets(tmp_path, caplog):
    images = [(f"{i}.png", _rgb(64, 80, i), {"width": 640, "height": 800}) for i in range(1, 4)]
    anns = [_ann(i, i, [5, 5, 30, 40]) for i in range(1, 4)] + [_ann(10 + i, i, [300, 300, 100, 100])
                                                                for i in range(1, 4)]
    ann_file = _write_coco(tmp_path, images, anns)
    with caplog.at_level(logging.INFO, logger="datasets.coco"):
        ds = CocoDetection(tmp_path / "img", ann_file)
    assert "3 image(s) whose width/height differ from the file (e.g. 1.png: entry 640x800, file 64x80)" in caplog.text
    assert "3 annotations kept of 6" in caplog.text
    assert "dropped 3 annotation(s) whose box lies wholly outside" in caplog.text
    assert sum(len(ds[i][1]["boxes"]) for i in range(len(ds))) == len(ds.coco.anns) == 3
    assert ds.coco.imgs[1]["width"] == 64 and ds.coco.imgs[1]["height"] == 80


def _formats(folder):
    """Image files of other formats and modes, each (file_name, its shown size)."""
    rng = np.random.default_rng(1)
    base = PIL.Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    base.convert("CMYK").save(folder / "cmyk.jpg")
    base.convert("P").save(folder / "palette.png", transparency=0)
    base.convert("1").save(folder / "bit1.png")
    base.convert("RGBA").save(folder / "rgba.png")
    base.convert("LA").save(folder / "grey_alpha.png")
    frames = [base.convert("P"), base.rotate(90).convert("P")]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    base.save(folder / "img.webp")
    base.save(folder / "img.bmp")
    base.save(folder / "really_png.jpg", format="PNG")  # the extension lies
    base.convert("I;16").save(folder / "grey16.tif")
    return ["cmyk.jpg", "palette.png", "bit1.png", "rgba.png", "grey_alpha.png", "anim.gif", "img.webp", "img.bmp",
            "really_png.jpg", "grey16.tif"]


def test_other_formats_and_modes_read_as_rgb(tmp_path):
    (tmp_path / "img").mkdir()
    names = _formats(tmp_path / "img")
    ann_file = _write_coco(tmp_path, [(n, None, {"width": 40, "height": 30}) for n in names],
                           [_ann(i, i, [2, 2, 10, 10]) for i in range(1, len(names) + 1)])
    ds = CocoDetection(tmp_path / "img", ann_file)
    for i in range(len(names)):
        image, target = ds[i]
        assert image.mode == "RGB" and image.size == (40, 30) and len(target["boxes"]) == 1, names[i]
        assert target["image_id"].item() == i + 1, names[i]  # read, not skipped


def test_rgb48_png_keeps_its_levels(tmp_path):
    import struct
    import zlib

    rows = b"".join(b"\x00" + np.full((40, 3), 0x8000, ">u2").tobytes() for _ in range(30))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    (tmp_path / "img").mkdir()
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 30, 16, 2, 0, 0, 0))  # 16 bits per channel, RGB
    (tmp_path / "img" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(rows))
                                             + chunk(b"IEND", b""))
    ann_file = _write_coco(tmp_path, [("a.png", None, {})], [])
    image, _ = CocoDetection(tmp_path / "img", ann_file)[0]
    assert np.asarray(image)[0, 0].tolist() == [128, 128, 128]


def test_annotation_file_with_a_byte_order_mark_loads(tmp_path):
    ann_file = _write_coco(tmp_path, [("1.png", _rgb(40, 30), {})], [_ann(1, 1, [2, 2, 10, 10])])
    ann_file.write_bytes(b"\xef\xbb\xbf" + ann_file.read_bytes())
    assert len(CocoDetection(tmp_path / "img", ann_file).coco.anns) == 1


BAD_ENTRIES = [
    ("images", 0, "id", "img1", "image id 'img1' (a str)"),
    ("images", 0, "id", 1.5, "image id 1.5 (a float)"),
    ("images", 0, "id", True, "image id True (a bool)"),
    ("images", 0, "file_name", 7, "file_name 7 (a int)"),
    ("annotations", 0, "image_id", "1", "image_id '1' (a str)"),
    ("annotations", 0, "category_id", "2", "category_id '2' (a str)"),
    ("annotations", 0, "category_id", -1, "category_id -1"),
    ("annotations", 0, "category_id", None, "category_id None"),
    ("annotations", 0, "iscrowd", "0", "iscrowd '0' (a str)"),
    ("annotations", 0, "area", "12", "area '12' (a str)"),
    ("annotations", 0, "id", [1], "annotation id [1]"),
    ("categories", 1, "id", "2", "category id '2' (a str)"),
]


@pytest.mark.parametrize("kind,index,field,value,message", BAD_ENTRIES, ids=[m for *_, m in BAD_ENTRIES])
def test_ids_and_fields_of_the_wrong_type_are_refused_at_indexing(tmp_path, kind, index, field, value, message):
    ann_file = _write_coco(tmp_path, [("1.png", _rgb(40, 30), {"width": 40, "height": 30})],
                           [_ann(1, 1, [2, 2, 10, 10], category_id=2)])
    data = json.loads(ann_file.read_text())
    data[kind][index][field] = value
    ann_file.write_text(json.dumps(data))
    with pytest.raises(AnnotationError) as info:
        CocoDetection(tmp_path / "img", ann_file)
    assert str(ann_file) in str(info.value) and message in str(info.value)


def test_annotation_file_that_is_a_folder_or_image_folder_that_is_a_file(tmp_path):
    ann_file = _write_coco(tmp_path, [("1.png", _rgb(40, 30), {})], [])
    with pytest.raises(AnnotationError, match="is a folder"):
        CocoDetection(tmp_path / "img", tmp_path / "img")
    with pytest.raises(NotADirectoryError, match="is a file"):
        CocoDetection(ann_file, ann_file)


def test_integral_float_ids_are_read_as_integers(tmp_path):
    ann_file = _write_coco(tmp_path, [("1.png", _rgb(40, 30), {})], [_ann(1, 1, [2, 2, 10, 10], category_id=2)])
    data = json.loads(ann_file.read_text())
    data["images"][0]["id"] = data["annotations"][0]["image_id"] = 1.0
    data["annotations"][0]["category_id"] = data["categories"][1]["id"] = 2.0
    ann_file.write_text(json.dumps(data))
    _, target = CocoDetection(tmp_path / "img", ann_file)[0]
    assert target["image_id"].tolist() == [1] and target["labels"].tolist() == [2]


def test_duplicated_category_ids_are_refused(tmp_path):
    ann_file = _write_coco(tmp_path, [("1.png", _rgb(40, 30), {})], [], categories=(1, 2, 2))
    with pytest.raises(AnnotationError, match="duplicated category id"):
        CocoDetection(tmp_path / "img", ann_file)


def test_no_readable_image_is_refused_at_build(tmp_path):
    ann_file = _write_coco(tmp_path, [("1.png", None, {}), ("2.png", None, {})], [])
    (tmp_path / "img" / "2.png").write_bytes(b"not an image")
    with pytest.raises(NoReadableImageError, match="none of the 2 images"):
        CocoDetection(tmp_path / "img", ann_file)


def test_string_ids_exit_1_naming_the_file(tmp_path, monkeypatch, capsys):
    ann_file = _write_coco(tmp_path, [("1.png", _rgb(40, 30), {})], [_ann(1, 1, [2, 2, 10, 10])])
    data = json.loads(ann_file.read_text())
    data["images"][0]["id"] = data["annotations"][0]["image_id"] = "a"
    ann_file.write_text(json.dumps(data))
    code, err = _cli(monkeypatch, capsys, _coco_flags(ann_file, tmp_path / "out"))
    assert code == 1
    _assert_one_line(err, str(ann_file), "image id 'a'")


# ------------------------------------------------------------------------------------------------
# flags
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--dec_layers", "0"], "--dec_layers"), (["--nheads", "0"], "--nheads"), (["--num_queries", "0"], "--num_queries"),
    (["--save_every", "0"], "--save_every"), (["--eval_every", "0"], "--eval_every"), (["--lr_drop", "0"], "--lr_drop"),
    (["--num_feature_levels", "6"], "--num_feature_levels"), (["--device", "gpu"], "--device"),
    (["--auto_resume", "--output_dir", ""], "--auto_resume needs --output_dir"),
    (["--resume_weights_only"], "--resume_weights_only needs --resume"),
    (["--set_cost_class", "0", "--set_cost_bbox", "0", "--set_cost_giou", "0"], "the matcher needs one cost"),
    (["--dilation"], "--dilation (DC5) needs --backbone resnet50 or resnet101"),
    (["--msda_impl", "foo"], "--msda_impl must be"), (["--msda_impl", "cuda"], "--msda_impl cuda runs on CUDA"),
])
def test_impossible_flags_exit_2_before_anything(tmp_path, monkeypatch, capsys, flags, needle):
    code, err = _cli(monkeypatch, capsys, synthetic_flags(tmp_path, "out") + flags)
    assert code == 2
    _assert_one_line(err, needle)
    assert not (tmp_path / "data").exists()  # refused before the data set was made


def test_cuda_device_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FlagError, match=r"--device cuda:3: this machine has 1 CUDA device\(s\)"):
        train_main.check_device(_args(["--device", "cuda:3"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = _args(["--device", "cuda:3"])
    train_main.check_device(args)  # no CUDA at all: cpu, with a warning (documented)
    assert args.device == "cpu"
    with pytest.raises(FlagError, match="--msda_impl cuda needs CUDA"):
        train_main.check_device(_args(["--device", "cuda", "--msda_impl", "cuda"]))


def test_output_dir_that_is_a_file_is_refused(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("x")
    for out, needle in ((tmp_path / "afile", "is a file"), (tmp_path / "afile" / "sub", "which is a file")):
        code, err = _cli(monkeypatch, capsys, synthetic_flags(tmp_path, "x") + ["--output_dir", str(out)])
        assert code == 2
        _assert_one_line(err, f"--output_dir {out}", needle)


def test_resume_of_a_missing_file_or_a_folder_is_refused(tmp_path, monkeypatch, capsys):
    for path, needle in ((tmp_path / "nope.pth", "no such file"), (tmp_path, "is a folder")):
        code, err = _cli(monkeypatch, capsys, synthetic_flags(tmp_path, "out") + ["--resume", str(path)])
        assert code == 2
        _assert_one_line(err, f"--resume {path}", needle)


@pytest.mark.parametrize("extra", [[], ["--auto_resume"]], ids=["plain", "auto_resume"])
def test_eval_with_nothing_to_evaluate_is_refused(tmp_path, monkeypatch, capsys, extra):
    code, err = _cli(monkeypatch, capsys, synthetic_flags(tmp_path, "out") + ["--eval", *extra])
    assert code == 2
    _assert_one_line(err, "--eval: nothing to evaluate", "--resume FILE")
    assert not (tmp_path / "out" / "eval.pth").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize("flag,needle", [("--coco_path", "instances_val2017.json not found"),
                                         ("--pretrained_backbone_path", "does not exist (nothing is downloaded")])
def test_missing_data_or_weights_exit_1(tmp_path, monkeypatch, capsys, flag, needle):
    flags = synthetic_flags(tmp_path, "out") + [flag, str(tmp_path / "nope")]
    if flag == "--coco_path":
        flags += ["--dataset_file", "coco"]
    code, err = _cli(monkeypatch, capsys, flags)
    assert code == 1
    _assert_one_line(err, str(tmp_path / "nope"), needle)


@pytest.mark.parametrize("given", [True, False], ids=["given", "from_the_training_file"])
def test_num_classes_below_the_labels_is_refused_naming_both(tmp_path, given):
    images = [(f"{i}.png", _rgb(40, 30, i), {}) for i in range(1, 3)]
    train = _write_coco(tmp_path / "train", images, [_ann(1, 1, [2, 2, 10, 10], 2)], categories=(1, 2))
    val = _write_coco(tmp_path / "val", images, [_ann(1, 1, [2, 2, 10, 10], 5)], categories=(1, 5))
    flags = _coco_flags(train, tmp_path / "out", "--val_img_folder", str(val.parent / "img"), "--val_ann_file",
                        str(val)) + (["--num_classes", "3"] if given else [])
    with pytest.raises(FlagError) as info:
        train_main.main(_args(flags))
    message = str(info.value)
    assert "--num_classes 3 is too small" in message and str(val) in message and "up to 5" in message
    assert "--num_classes 6" in message


def test_synthetic_num_classes_3_exits_2(tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, synthetic_flags(tmp_path, "out") + ["--num_classes", "3"])
    assert code == 2
    _assert_one_line(err, "--num_classes 3", "instances_train2017.json", "up to 5")


def test_batch_larger_than_the_training_set_is_refused(tmp_path):
    ann_file = _write_coco(tmp_path, [("1.png", _rgb(40, 30), {}), ("2.png", _rgb(40, 30, 1), {})], [])
    with pytest.raises(FlagError, match="--batch_size 4 x 1 process"):
        train_main.main(_args(_coco_flags(ann_file, tmp_path / "out", "--batch_size", "4")))


def test_num_feature_levels_2_trains(tmp_path):
    stats = train_main.main(_args(synthetic_flags(tmp_path, "out", "--num_feature_levels", "2", "--epochs", "1",
                                                  "--max_iters_per_epoch", "1")))
    assert np.isfinite(stats["train_loss"])


# ------------------------------------------------------------------------------------------------
# checkpoints (one trained run, shared)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch tiny run: its output folder (checkpoint.pth, checkpoint0000.pth, log.txt)."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    train_main.main(_args(synthetic_flags(root, "out", "--epochs", "1")))
    return root / "out"


def test_numbered_checkpoint_is_the_same_bytes_written_once(trained):
    assert os.path.samefile(trained / "checkpoint.pth", trained / "checkpoint0000.pth")


def test_resume_into_another_model_names_flags_and_keys(trained, tmp_path):
    flags = synthetic_flags(tmp_path, "out", "--epochs", "2", "--resume", str(trained / "checkpoint.pth"),
                            "--with_box_refine")
    with pytest.raises(FlagError) as info:
        train_main.main(_args(flags))
    message = str(info.value)
    assert f"checkpoint {trained / 'checkpoint.pth'} is of another model" in message
    assert "missing from it (e.g. transformer.decoder.bbox_embed" in message
    assert "--with_box_refine True (checkpoint: False)" in message and "--resume_weights_only" in message
    assert not (tmp_path / "out" / "log.txt").exists() and not list((tmp_path / "out").glob("*.pth"))


def test_eval_of_another_model_is_refused(trained, tmp_path):
    flags = synthetic_flags(tmp_path, "out", "--eval", "--resume", str(trained / "checkpoint.pth"), "--nheads", "8")
    with pytest.raises(FlagError, match=r"key\(s\) of another shape .*--nheads 8 \(checkpoint: 4\)"):
        train_main.main(_args(flags))
    assert not (tmp_path / "out" / "eval.pth").exists()


def test_resume_weights_only_loads_what_fits_and_starts_anew(trained, tmp_path, caplog):
    flags = synthetic_flags(tmp_path, "out", "--epochs", "1", "--max_iters_per_epoch", "1", "--resume",
                            str(trained / "checkpoint.pth"), "--with_box_refine", "--resume_weights_only")
    with caplog.at_level(logging.INFO, logger="detr"):
        train_main.main(_args(flags))
    assert "--resume_weights_only" in caplog.text and "optimizer, schedule and epochs start anew" in caplog.text
    assert _epochs(tmp_path / "out") == [0]
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoint.pth")
    assert any("bbox_embed.0" in k for k in ckpt["model"])


def test_resume_with_another_optimizer_layout_is_refused(trained, tmp_path):
    flags = synthetic_flags(tmp_path, "out", "--epochs", "2", "--resume", str(trained / "checkpoint.pth"),
                            "--lr_backbone", "0")
    with pytest.raises(FlagError, match=r"cannot continue this run: its optimizer .*--lr_backbone 0.0"):
        train_main.main(_args(flags))


def test_truncated_checkpoint_names_the_file(trained, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "trunc.pth"
    bad.write_bytes((trained / "checkpoint.pth").read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="truncated, damaged or not a PyTorch checkpoint"):
        load_checkpoint(bad)
    code, err = _cli(monkeypatch, capsys, synthetic_flags(tmp_path, "out") + ["--eval", "--resume", str(bad)])
    assert code == 1
    _assert_one_line(err, f"checkpoint {bad} cannot be read")


def test_checkpoint_without_model_or_with_objects(tmp_path):
    torch.save({"precision": torch.zeros(2)}, tmp_path / "eval.pth")
    with pytest.raises(CheckpointError, match="has no 'model' entry"):
        load_checkpoint(tmp_path / "eval.pth")
    torch.save({"model": {}, "args": object()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="holds objects other than tensors"):
        load_checkpoint(tmp_path / "evil.pth")


def _old_run(out, *checkpoints):
    out.mkdir(parents=True)
    (out / "log.txt").write_text(json.dumps({"epoch": 0}) + "\n" + json.dumps({"epoch": 1}) + "\n")
    for name in checkpoints:
        (out / name).write_bytes(b"PK\x03\x04 truncated")


def test_auto_resume_without_a_readable_checkpoint_refuses_over_a_log(tmp_path, monkeypatch, capsys):
    _old_run(tmp_path / "out", "checkpoint.pth", "checkpoint0001.pth")
    code, err = _cli(monkeypatch, capsys, synthetic_flags(tmp_path, "out", "--auto_resume"))
    assert code == 2
    _assert_one_line(err, "--auto_resume: none of the 2 checkpoint(s)", "can be read", "already holds a run",
                     "log.txt with 2 epoch(s)", "--overwrite")
    assert _epochs(tmp_path / "out") == [0, 1]  # untouched


def test_overwrite_starts_over(tmp_path, caplog):
    _old_run(tmp_path / "out", "checkpoint.pth", "checkpoint0007.pth")
    with caplog.at_level(logging.WARNING, logger="detr"):
        train_main.main(_args(synthetic_flags(tmp_path, "out", "--auto_resume", "--overwrite", "--epochs", "1",
                                              "--max_iters_per_epoch", "1")))
    assert "--overwrite: deleted the earlier run's log.txt with 2 epoch(s), 2 checkpoint file(s)" in caplog.text
    assert _epochs(tmp_path / "out") == [0]
    assert not (tmp_path / "out" / "checkpoint0007.pth").exists()


def test_finished_run_says_there_is_nothing_to_train(trained, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    os.link(trained / "checkpoint.pth", out / "checkpoint.pth")
    (out / "log.txt").write_bytes((trained / "log.txt").read_bytes())
    with caplog.at_level(logging.WARNING, logger="detr"):
        train_main.main(_args(synthetic_flags(tmp_path, "out", "--auto_resume", "--epochs", "1")))
    assert "nothing to train: the run starts at epoch 1 and --epochs is 1" in caplog.text
    assert _epochs(out) == [0]


def test_a_leftover_temporary_file_is_no_run(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoint.pth.tmp").write_bytes(b"killed while saving")
    train_main.main(_args(synthetic_flags(tmp_path, "out", "--auto_resume", "--epochs", "1",
                                          "--max_iters_per_epoch", "1")))
    assert _epochs(tmp_path / "out") == [0]


def test_fresh_run_over_an_earlier_run_is_refused(tmp_path):
    _old_run(tmp_path / "out")
    with pytest.raises(FlagError, match="already holds a run .*pass --auto_resume to continue it, --overwrite"):
        train_main.main(_args(synthetic_flags(tmp_path, "out")))


def test_backbone_file_of_another_architecture(tmp_path, monkeypatch, capsys):
    import torchvision

    cases = {"r50.pth": (torchvision.models.resnet50, "tensors have other shapes than resnet18's"),
             "r34.pth": (torchvision.models.resnet34, "tensors resnet18 does not (e.g. layer1.2"),
             "other.pth": (lambda weights: torch.nn.Linear(2, 2), "none of its 2 names")}
    for name, (make, needle) in cases.items():
        torch.save(make(weights=None).state_dict(), tmp_path / name)
        flags = synthetic_flags(tmp_path, "out") + ["--pretrained_backbone_path", str(tmp_path / name)]
        code, err = _cli(monkeypatch, capsys, flags)
        assert code == 1
        _assert_one_line(err, f"--pretrained_backbone_path {tmp_path / name} does not hold resnet18 weights", needle)


# ------------------------------------------------------------------------------------------------
# faults
# ------------------------------------------------------------------------------------------------
def _full_disk(monkeypatch):
    def save(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", save)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    os.link(trained / "checkpoint.pth", out / "checkpoint.pth")  # the previous run's epoch 0, not copied
    (out / "log.txt").write_bytes((trained / "log.txt").read_bytes())
    _full_disk(monkeypatch)
    code, err = _cli(monkeypatch, capsys, synthetic_flags(tmp_path, "out", "--auto_resume", "--epochs", "2",
                                                          "--max_iters_per_epoch", "1"))
    assert code == 1
    _assert_one_line(err, f"cannot write {out / 'checkpoint.pth'}: no space left", "it needs about", "MB",
                     "is free", "the previous checkpoint.pth is kept", "--auto_resume")
    assert not list(out.glob("*.tmp"))
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0 and _epochs(out) == [0]


def test_full_disk_for_the_numbered_copy_and_other_writes(tmp_path, monkeypatch):
    src = tmp_path / "checkpoint.pth"
    save_atomic({"model": {"w": torch.ones(3)}}, src)
    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")
    monkeypatch.setattr(os, "link", no_links)
    link_atomic(src, tmp_path / "checkpoint0000.pth")  # copied where hard links fail
    assert not os.path.samefile(src, tmp_path / "checkpoint0000.pth")
    assert load_checkpoint(tmp_path / "checkpoint0000.pth")["model"]["w"].tolist() == [1.0] * 3
    link_atomic(src, tmp_path / "checkpoint0000.pth")  # same bytes: nothing written
    _full_disk(monkeypatch)
    with pytest.raises(DiskFullError, match="eval.pth: no space left"):
        save_atomic({"a": torch.zeros(10)}, tmp_path / "eval.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth", "checkpoint0000.pth"]


def test_interrupted_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.torch, "save", save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"model": {}}, tmp_path / "checkpoint.pth")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_dir_exits_1(tmp_path, monkeypatch, capsys):
    def denied(args):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "out"))
    monkeypatch.setattr(train_main, "main", denied)
    code, err = _cli(monkeypatch, capsys, ["--device", "cpu"])
    assert code == 1
    _assert_one_line(err, "Permission denied", str(tmp_path / "out"))


@pytest.mark.parametrize("code,needle", [(errno.ENOSPC, "no space left on the device while writing"),
                                         (errno.EROFS, "Read-only file system")], ids=["full", "read_only"])
def test_other_write_faults_exit_1_naming_the_file(tmp_path, monkeypatch, capsys, code, needle):
    def fault(args):
        raise OSError(code, os.strerror(code), str(tmp_path / "log.txt"))
    monkeypatch.setattr(train_main, "main", fault)
    status, err = _cli(monkeypatch, capsys, ["--device", "cpu"])
    assert status == 1
    _assert_one_line(err, needle, str(tmp_path / "log.txt"))


def test_unknown_backbone_is_a_flag_error():
    from models import build_model
    from tests.conftest import tiny_args
    from util.errors import FlagError

    with pytest.raises(FlagError, match="--backbone resnet19: unknown backbone"):
        build_model(tiny_args("--backbone", "resnet19"))
