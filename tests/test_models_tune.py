"""``dmpo-edge tune``: one short real tune on digits, and one-line errors for bad input."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dmpo_edge.calib.datasets import load_dataset, write_image_folder
from dmpo_edge.cli import main
from dmpo_edge.models import load_checkpoint

# a ViT small enough to tune in seconds (random init): for the folder / bad-input paths
TINY_VIT_ARGS = ["--backbone", "vit", "--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--patch-size", "8",
                 "--image-size", "32", "--exits", "0", "--cov-dim", "8", "--bypass-dim", "8", "--adapter-dim", "4",
                 "--no-pretrained", "--quiet"]


def _one_line_error(capsys, argv, pattern):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert pattern in err, err
    return err


@pytest.mark.slow
def test_short_tune_on_digits_every_exit_well_above_chance(tmp_path, capsys):
    out = tmp_path / "model.pt"
    # the real pre-trained EfficientNet-Lite0 trunk, small input, two epochs: a few tens of seconds on 2 cores
    rc = main(["tune", "--data", "digits", "--image-size", "32", "--exits", "4,10", "--epochs", "2", "--seed", "1",
               "--threads", "1", "-o", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert "val acc" in printed and "cumulative MFLOPs" in printed
    model, meta = load_checkpoint(out)
    m = meta["metrics"]
    assert len(m["exit_accuracy"]) == model.num_stages == 3
    assert min(m["exit_accuracy"]) > 0.6, m["exit_accuracy"]  # chance is 0.1
    assert m["cumulative_flops"] == list(np.cumsum(m["stage_flops"]))
    assert m["cumulative_flops"][0] < m["cumulative_flops"][-1]
    assert meta["loss_schedule"]["mode"] == "two_phase" and meta["config"]["exits"] == [4, 10, 15]
    assert m["val_data"] == "digits:val" and m["train_data"] == "digits:train"
    # the stored accuracy is what the stored model computes on digits:val
    from dmpo_edge.models.tuning import evaluate_exits, preprocess_images
    from dmpo_edge.preprocess import Preprocess

    val = load_dataset("digits:val")
    acc = evaluate_exits(model, preprocess_images(val.images, Preprocess.from_dict(meta["preprocess"])), val.labels)
    np.testing.assert_allclose(acc, m["exit_accuracy"], atol=1e-9)


def test_folder_tune_counts_unreadable_images(tmp_path, capsys):
    root = tmp_path / "data"
    write_image_folder(load_dataset("digits:train").take(60, seed=0), str(root))
    (root / "3" / "broken.png").write_bytes(b"not a png at all")
    out = tmp_path / "m.pt"
    with pytest.warns(UserWarning, match="skipped 1"):
        rc = main(["tune", "--data", str(root), "--epochs", "1", "-o", str(out), *TINY_VIT_ARGS])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "skipped 1 unreadable image" in captured.err and "broken.png" in captured.err
    _, meta = load_checkpoint(out)
    assert meta["metrics"]["skipped_images"] == 1
    assert meta["metrics"]["num_train"] + meta["metrics"]["num_val"] == 60
    assert meta["classes"] == [str(i) for i in range(10)]


def test_bad_data_is_one_line_error(tmp_path, capsys):
    _one_line_error(capsys, ["tune", "--data", str(tmp_path / "nope"), *TINY_VIT_ARGS], "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, ["tune", "--data", str(empty), *TINY_VIT_ARGS], "no class sub-folders")
    root = tmp_path / "classes"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "a.png")
    _one_line_error(capsys, ["tune", "--data", str(root), *TINY_VIT_ARGS], "has no images")


def test_exits_beyond_depth_and_bad_output_are_one_line_errors(tmp_path, capsys):
    _one_line_error(capsys, ["tune", "--data", "digits", "--exits", "3,16", "--epochs", "1", "-o", str(tmp_path / "m.pt"), "--quiet"],
                    "beyond the depth")
    _one_line_error(capsys, ["tune", "--data", "digits", "-o", str(tmp_path), *TINY_VIT_ARGS], "is a folder")
    assert not (tmp_path / "m.pt").exists()
