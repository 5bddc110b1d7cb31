"""`hcsc-eval` end to end on tiny Fashion-MNIST shards with a random-init resnet18_small checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluate import commands
from evaluate.cli import main
from tests.evaluate.conftest import TRAIN_N, VAL_N, tiny_hcsc

LOADER = ["--encoder", "resnet18_small", "--image-size", "16", "--resize", "16", "--batch-size", "48",
          "--workers", "1"]
LOADER_KW = {"encoder": "resnet18_small", "image_size": 16, "resize": 16, "batch_size": 48, "workers": 1}


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _trainer_run_dir(root: Path) -> Path:
    """The same weights as `official_ckpt`, laid out as our trainer writes them."""
    tag = root / "checkpoints" / "epoch0001-batch000000"
    tag.mkdir(parents=True)
    torch.save({"module": tiny_hcsc().state_dict(), "epoch": 1,
                "config_yaml": "model:\n  encoder: resnet18_small\n"}, tag / "mp_rank_00_model_states.pt")
    (root / "checkpoints" / "latest").write_text(tag.name)
    return root


@pytest.mark.slow
def test_knn_cli_official_and_trainer_checkpoints_agree(fm_shards, official_ckpt, tmp_path, capsys):
    out = tmp_path / "knn.json"
    code = main(["knn", "--checkpoint", str(official_ckpt), "--train-shards", str(fm_shards),
                 "--val-shards", str(fm_shards), "--k", "1,5,20", "--out", str(out), *LOADER])
    assert code == 0
    result = _last_json(capsys)
    assert result == json.loads(out.read_text())
    assert (result["bank"], result["queries"], result["num_classes"]) == (TRAIN_N, VAL_N, 10)
    assert set(result["knn"]) == {"1", "5", "20"}
    for acc in result["knn"].values():
        assert 0 <= acc["top1"] <= acc["top5"] <= 100
    # random conv features still separate Fashion-MNIST far above chance (10 %)
    assert result["knn"]["5"]["top1"] > 30
    # the same weights in our trainer's run-dir layout, encoder read from the stored config
    # (bicubic: the CLI's knn default, method.md §7.1)
    again = commands.run_knn(checkpoint=str(_trainer_run_dir(tmp_path / "run")), train_shards=str(fm_shards),
                             val_shards=str(fm_shards), ks=[1, 5, 20],
                             **{**LOADER_KW, "encoder": None, "interpolation": "bicubic"})
    assert again["knn"] == result["knn"]


def _knn_on_ranks(ckpt: str, shards: str) -> dict:
    return commands.run_knn(checkpoint=ckpt, train_shards=shards, val_shards=shards, ks=[1, 5, 20],
                            **LOADER_KW)


@pytest.mark.slow
@pytest.mark.dist
def test_knn_on_two_ranks_equals_one_process(dist_run, fm_shards, official_ckpt):
    expected = _knn_on_ranks(str(official_ckpt), str(fm_shards))
    for got in dist_run(_knn_on_ranks, 2, str(official_ckpt), str(fm_shards)):
        for k, acc in expected["knn"].items():
            assert got["knn"][k] == pytest.approx(acc)


@pytest.mark.slow
def test_cluster_cli_scores_every_level(fm_shards, official_ckpt, capsys):
    code = main(["cluster", "--checkpoint", str(official_ckpt), "--shards", str(fm_shards),
                 "--num-clusters", "12,4", "--nredo", "2", *LOADER])
    assert code == 0
    result = _last_json(capsys)
    assert result["num_samples"] == VAL_N and [r["clusters"] for r in result["levels"]] == [12, 4]
    for row in result["levels"]:
        assert set(row) == {"level", "clusters", "nmi", "ami", "ari", "acc", "purity"}
        assert 0 < row["nmi"] <= 1 and 0 < row["acc"] <= row["purity"] <= 1
    # coarser levels cannot be purer than the level they merge
    assert result["levels"][1]["purity"] <= result["levels"][0]["purity"]


def test_cluster_refuses_impossible_levels(fm_shards, official_ckpt, capsys):
    code = main(["cluster", "--checkpoint", str(official_ckpt), "--shards", str(fm_shards),
                 "--num-clusters", "4,8", *LOADER])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "strictly decreasing" in err[-1] and "--num-clusters" in err[-1]


@pytest.mark.slow
def test_linear_cli_trains_and_resumes(fm_shards, official_ckpt, tmp_path, capsys):
    args = ["linear", "--checkpoint", str(official_ckpt), "--train-shards", str(fm_shards), "--val-shards",
            str(fm_shards), "--out", str(tmp_path / "probe"), "--epochs", "2", "--milestones", "1",
            "--lr", "0.5", *LOADER[:-4], "--batch-size", "32", "--workers", "1"]
    assert main(args) == 0
    first = _last_json(capsys)
    assert 0 <= first["last_top1"] <= first["best_top1"] <= 100
    history = json.loads((tmp_path / "probe" / "linear_result.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [0, 1] and history[1]["lr"] == pytest.approx(0.05)
    assert main(args) == 0  # a rerun finds every epoch done and reports the same result
    assert _last_json(capsys)["last_top1"] == first["last_top1"]


def test_import_and_export_cli(official_ckpt, tmp_path, capsys):
    ours = tmp_path / "imported.pth"
    assert main(["import-official", str(official_ckpt), str(ours)]) == 0
    assert _last_json(capsys)["encoder_k"] is True
    assert main(["export", "--format", "detectron2", str(ours), str(tmp_path / "d2.pkl")]) == 0
    assert _last_json(capsys)["keys"] > 0 and (tmp_path / "d2.pkl").is_file()
    assert main(["export", "--format", "torchvision", str(ours), str(tmp_path / "tv.pth")]) == 0
    assert "conv1.weight" in torch.load(tmp_path / "tv.pth", weights_only=True)


def test_bad_checkpoint_is_one_line(tmp_path, capsys, fm_shards):
    code = main(["knn", "--checkpoint", str(tmp_path / "nope.pth"), "--train-shards", str(fm_shards),
                 "--val-shards", str(fm_shards), *LOADER])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "nope.pth" in err and len(err.splitlines()) == 1  # nothing ran before the check


@pytest.mark.parametrize(("command", "extra", "want"), [
    (["knn", "--train-shards", "A", "--val-shards", "B"], [], "bicubic"),  # method.md §7.1
    (["cluster", "--shards", "A"], [], "bicubic"),
    (["linear", "--train-shards", "A", "--val-shards", "B", "--out", "O"], [], "bilinear"),  # PCL protocol
    (["knn", "--train-shards", "A", "--val-shards", "B"], ["--interpolation", "bilinear"], "bilinear"),
])
def test_eval_resize_filter_defaults_per_command(tmp_path, command, extra, want):
    from evaluate.cli import _loader_args, build_parser

    args = build_parser().parse_args([*command, "--checkpoint", str(tmp_path / "none.pth"), *extra])
    assert _loader_args(args)["interpolation"] == want
