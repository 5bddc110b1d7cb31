"""`hcsc-eval`'s error boundary: every mistake is one line naming the flag or path and what to do,
found before any work, with nothing of the user's lost; stdout carries only the JSON result."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate.commands
import evaluate.interop
import evaluate.report
import evaluate.stored
from evaluate.cli import main
from evaluate.report import Node, ReportData, write_report
from tests.evaluate.test_cli import LOADER

HCSC_EVAL = Path(sys.executable).parent / "hcsc-eval"
PRECIOUS = b"the user's file, which no failed command may touch\n"


@dataclass
class Ctx:
    """Paths a row's command line is built from (see `workspace`)."""

    ckpt: Path  # a good official checkpoint
    shards: Path  # good shards: train 160, val 64
    tmp: Path  # the user's folder: every file in it must survive a failed command unchanged


@dataclass
class Row:
    """One mistake: the command, what the one line must say, and the corrected command (if cheap)."""

    name: str
    argv: Callable[[Ctx], list[str]]
    want: list[str]  # substrings of the error line
    code: int = 2
    absent: list[str] = field(default_factory=list)  # substrings the line must not have
    fix: Callable[[Ctx], list[str]] | None = None
    # found by reading the weights, the first step of the work (before any data); every other
    # mistake is found before the checkpoint is read
    reading: bool = False


def workspace(tmp: Path, ckpt: Path, shards: Path) -> Ctx:
    """Inputs of every row; the files the user owns hold PRECIOUS."""
    (tmp / "random.pth").write_bytes(np.random.default_rng(0).bytes(1024))
    (tmp / "config.pth").write_text("model:\n  encoder: resnet50\n")
    (tmp / "empty.pth").write_bytes(b"")
    with (tmp / "plain.pkl").open("wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros(3)}}, f)
    good = ckpt.read_bytes()
    (tmp / "truncated.pth").write_bytes(good[:len(good) // 2])
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": _Opaque()}, tmp / "code.pth")
    (tmp / "existing.pth").write_bytes(PRECIOUS)
    (tmp / "result.json").write_bytes(PRECIOUS)
    (tmp / "afile").write_bytes(PRECIOUS)
    (tmp / "old_report").mkdir()
    (tmp / "old_report" / "index.html").write_bytes(PRECIOUS)
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_bytes(PRECIOUS)
    (tmp / "no_manifest").mkdir()
    broken = tmp / "broken_shards"
    shutil.copytree(shards, broken)
    (broken / "val-000001.tar").unlink()
    return Ctx(ckpt, shards, tmp)


class _Opaque:
    """Pickled by reference: loading it needs code (module and class lookup)."""


def _knn(c: Ctx, *extra: str, ckpt: Path | None = None) -> list[str]:
    return ["knn", "--checkpoint", str(ckpt or c.ckpt), "--train-shards", str(c.shards), "--val-shards",
            str(c.shards), *LOADER, *extra]


def _cluster(c: Ctx, *extra: str) -> list[str]:
    return ["cluster", "--checkpoint", str(c.ckpt), "--shards", str(c.shards), *LOADER, "--nredo", "1",
            *extra]


def _report(c: Ctx, out: str, *extra: str, recluster: bool = True) -> list[str]:
    """`report` of the official checkpoint, which stores no prototypes: --recluster unless told not to."""
    flags = ["--recluster", "--shards", str(c.shards)] if recluster else []
    return ["report", "--checkpoint", str(c.ckpt), *flags, "--out", str(c.tmp / out), *LOADER, *extra]


def _export(src: Path, out: Path, *extra: str) -> list[str]:
    return ["export", "--format", "torchvision", str(src), str(out), *extra]


ROWS = [
    Row("missing checkpoint", lambda c: _knn(c, ckpt=c.tmp / "nope.pth"),
        ["--checkpoint", "nope.pth", "no such checkpoint"]),
    Row("random bytes .pth", lambda c: _knn(c, ckpt=c.tmp / "random.pth"),
        ["--checkpoint", "random.pth", "not a torch checkpoint"], absent=["unpickle code"]),
    Row("random bytes .pth, export", lambda c: _export(c.tmp / "random.pth", c.tmp / "tv.pth"),
        ["random.pth", "not a torch checkpoint"], absent=["unpickle code"],
        fix=lambda c: _export(c.ckpt, c.tmp / "tv.pth")),
    Row("a YAML file as checkpoint", lambda c: _knn(c, ckpt=c.tmp / "config.pth"),
        ["--checkpoint", "config.pth", "not a torch checkpoint"]),
    Row("empty checkpoint", lambda c: _export(c.tmp / "empty.pth", c.tmp / "tv.pth"),
        ["empty.pth", "empty file"]),
    Row("a plain pickle as checkpoint", lambda c: _export(c.tmp / "plain.pkl", c.tmp / "tv.pth"),
        ["plain.pkl", "not a torch checkpoint"], absent=["unpickle code"], reading=True),
    Row("truncated checkpoint",
        lambda c: ["import-official", str(c.tmp / "truncated.pth"), str(c.tmp / "o.pth")],
        ["truncated.pth", "damaged or truncated"], reading=True,
        fix=lambda c: ["import-official", str(c.ckpt), str(c.tmp / "o.pth")]),
    Row("checkpoint that needs code", lambda c: _export(c.tmp / "code.pth", c.tmp / "tv.pth"),
        ["code.pth", "refusing to unpickle code", "_Opaque"], reading=True),
    Row("wrong --encoder for the weights", lambda c: _knn(c, "--encoder", "resnet50"),
        ["--checkpoint", "weights do not fit", "--encoder"], reading=True),
    Row("unknown --encoder", lambda c: _knn(c, "--encoder", "resnet5"), ["--encoder 'resnet5'", "resnet50"]),
    Row("missing shards folder", lambda c: _knn(c, "--train-shards", str(c.tmp / "nope")),
        ["--train-shards", "nope", "no such folder"]),
    Row("shards folder is a file", lambda c: _cluster(c, "--shards", str(c.tmp / "afile")),
        ["--shards", "afile", "is a file"]),
    Row("folder without a manifest", lambda c: _knn(c, "--val-shards", str(c.tmp / "no_manifest")),
        ["--val-shards", "no_manifest", "_info.json", "hcsc-shards build"]),
    Row("missing split", lambda c: _cluster(c, "--split", "test"),
        ["--split 'test'", "no such split", "'train', 'val'"]),
    Row("missing --val-split", lambda c: _knn(c, "--val-split", "tset"),
        ["--val-split 'tset'", "no such split"]),
    Row("missing shard tar", lambda c: _cluster(c, "--shards", str(c.tmp / "broken_shards")),
        ["--shards", "val-000001.tar", "missing"]),
    Row("--resize smaller than --image-size", lambda c: _knn(c, "--image-size", "32", "--resize", "16"),
        ["--resize 16", "--image-size 32"], absent=["data."]),
    Row("--resize smaller than the default crop",
        lambda c: ["knn", "--checkpoint", str(c.ckpt), "--train-shards", str(c.shards), "--val-shards",
                   str(c.shards), "--encoder", "resnet18_small", "--resize", "16"],
        ["--resize 16", "224", "--image-size"], absent=["data."]),
    Row("--image-size too small", lambda c: _knn(c, "--image-size", "4", "--resize", "8"),
        ["--image-size", "8 px"], absent=["data."]),
    Row("--batch-size 0", lambda c: _knn(c, "--batch-size", "0"), ["--batch-size", ">= 1"]),
    Row("--num-clusters not decreasing", lambda c: _cluster(c, "--num-clusters", "4,8"),
        ["--num-clusters 4,8", "strictly decreasing"]),
    Row("--num-clusters above the split size", lambda c: _cluster(c, "--num-clusters", "100,10"),
        ["--num-clusters 100,10", "64 samples"], fix=lambda c: _cluster(c, "--num-clusters", "12,4")),
    Row("--num-clusters default above the split size", _cluster, ["--num-clusters 25000,1000", "64"]),
    Row("--num-clusters not a number", lambda c: _cluster(c, "--num-clusters", "many"),
        ["--num-clusters", "many", "--help"]),
    Row("report --num-clusters above the split size",
        lambda c: _report(c, "new_report", "--num-clusters", "65,4"), ["--num-clusters 65,4", "64 samples"]),
    # without --recluster the report shows the prototypes stored with our checkpoints
    Row("report of official weights without --recluster", lambda c: _report(c, "new_report", recluster=False),
        ["--checkpoint", "hcsc_random.pth.tar", "no prototypes", "--recluster"],
        fix=lambda c: _report(c, "new_report", "--nredo", "1")),
    Row("report --num-clusters without --recluster",
        lambda c: _report(c, "new_report", "--num-clusters", "12,4", recluster=False),
        ["--num-clusters 12,4", "only with --recluster"]),
    Row("report --recluster without --shards",
        lambda c: ["report", "--recluster", "--checkpoint", str(c.ckpt), "--out", str(c.tmp / "new_report")],
        ["--recluster", "--shards"]),
    Row("missing required flag", lambda c: ["knn", "--checkpoint", str(c.ckpt)],
        ["--train-shards", "--help"]),
    Row("export onto an existing file", lambda c: _export(c.ckpt, c.tmp / "existing.pth"),
        ["existing.pth", "already exists", "--force"],
        fix=lambda c: _export(c.ckpt, c.tmp / "existing.pth", "--force")),
    Row("import-official onto an existing file",
        lambda c: ["import-official", str(c.ckpt), str(c.tmp / "existing.pth")],
        ["existing.pth", "already exists", "--force"],
        fix=lambda c: ["import-official", str(c.ckpt), str(c.tmp / "existing.pth"), "--force"]),
    Row("export onto a folder", lambda c: _export(c.ckpt, c.tmp / "notes", "--force"),
        ["notes", "is a folder"],
        fix=lambda c: _export(c.ckpt, c.tmp / "notes" / "tv.pth")),
    Row("export under a file", lambda c: _export(c.ckpt, c.tmp / "afile" / "tv.pth"),
        ["afile", "not a folder"]),
    Row("knn --out onto an existing file", lambda c: _knn(c, "--out", str(c.tmp / "result.json")),
        ["--out", "result.json", "already exists", "--force"]),
    Row("report --out that is a file", lambda c: _report(c, "afile"), ["--out", "afile", "is a file"]),
    Row("report --out that is a file, even with --force", lambda c: _report(c, "afile", "--force"),
        ["--out", "afile", "is a file"]),
    Row("report --out holding a report", lambda c: _report(c, "old_report"),
        ["--out", "old_report", "index.html", "--force"],
        fix=lambda c: _report(c, "old_report", "--force", "--nredo", "1")),
    Row("report --out not empty", lambda c: _report(c, "notes"), ["--out", "notes", "not empty", "--force"]),
    # --out is checked before the checkpoint is even opened
    Row("report --out a file and a random checkpoint",
        lambda c: _report(c, "afile", "--checkpoint", str(c.tmp / "random.pth")),
        ["--out", "afile", "is a file"]),
    Row("linear --out that is a file", lambda c: ["linear", "--checkpoint", str(c.ckpt), "--train-shards",
                                                  str(c.shards), "--val-shards", str(c.shards), "--out",
                                                  str(c.tmp / "afile"), *LOADER],
        ["--out", "afile", "is a file"]),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refuse_work(monkeypatch: pytest.MonkeyPatch, *, reading: bool) -> None:
    """Fail loudly if a command gets as far as reading data, or (unless `reading`) the weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the command line was checked")

    for module in (evaluate.commands, evaluate.report):
        monkeypatch.setattr(module, "split_features", refuse)
        if not reading:
            monkeypatch.setattr(module, "load_backbone", refuse)
    monkeypatch.setattr(evaluate.report, "scan_split", refuse)
    if not reading:
        monkeypatch.setattr(evaluate.interop, "read_checkpoint", refuse)
        monkeypatch.setattr(evaluate.stored, "torch_load", refuse)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_a_mistake_is_one_line_naming_it(row, fm_shards, official_ckpt, tmp_path, capsys, monkeypatch):
    ctx = workspace(tmp_path, official_ckpt, fm_shards)
    before = _snapshot(tmp_path)
    _refuse_work(monkeypatch, reading=row.reading)
    code = main(row.argv(ctx))
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == row.code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err and out == ""
    assert lines[0].startswith("hcsc-eval")
    for text in row.want:
        assert text in lines[0], (text, lines[0])
    for text in row.absent:
        assert text not in lines[0], (text, lines[0])
    assert _snapshot(tmp_path) == before  # nothing of the user's changed, nothing half-written left
    if row.fix is not None:  # the corrected command works
        monkeypatch.undo()
        assert main(row.fix(ctx)) == 0
        out, _ = capsys.readouterr()
        assert len(out.splitlines()) == 1 and json.loads(out)


def test_force_replaces_the_file(official_ckpt, tmp_path, capsys):
    target = tmp_path / "tv.pth"
    target.write_bytes(PRECIOUS)
    assert main(_export(official_ckpt, target)) == 2
    assert target.read_bytes() == PRECIOUS
    assert main(_export(official_ckpt, target, "--force")) == 0
    assert "conv1.weight" in torch.load(target, weights_only=True)
    assert [p.name for p in tmp_path.iterdir()] == ["tv.pth"]  # no temporary file left
    capsys.readouterr()


def test_ctrl_c_leaves_the_old_file_and_one_line(official_ckpt, tmp_path, capsys, monkeypatch):
    target = tmp_path / "tv.pth"
    target.write_bytes(PRECIOUS)

    def interrupted_save(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate.interop.torch, "save", interrupted_save)
    assert main(_export(official_ckpt, target, "--force")) == 130
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "half-written" in lines[0]
    assert _snapshot(tmp_path) == {"tv.pth": PRECIOUS}


def test_debug_flag_prints_the_traceback(tmp_path, capsys):
    code = main(_export(tmp_path / "nope.pth", tmp_path / "tv.pth", "--debug"))
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("hcsc-eval export: error:")


def _tiny_report(cids: list[int]) -> ReportData:
    thumbs = {i: Image.new("RGB", (28, 28), (40 * i, 90, 200)) for i in range(4)}
    top = [Node(1, cid, 2, images=[(0, 0.9), (1, 0.8)]) for cid in cids]
    return ReportData("ckpt.pth", "val", 4, ["a"], None, [np.array([2, 2])], None, top, thumbs)


def test_report_force_leaves_one_reports_files(tmp_path):
    out = tmp_path / "report"
    write_report(_tiny_report([0, 1]), out)
    assert sorted(p.name for p in out.iterdir()) == ["cluster_L1_0.png", "cluster_L1_1.png", "index.html"]
    (out / "notes.txt").write_bytes(PRECIOUS)
    write_report(_tiny_report([1]), out)  # what --force leads to
    assert sorted(p.name for p in out.iterdir()) == ["cluster_L1_1.png", "index.html", "notes.txt"]
    assert (out / "notes.txt").read_bytes() == PRECIOUS
    assert Image.open(out / "cluster_L1_1.png").size[0] > 28


def _run(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(HCSC_EVAL), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, **kwargs)


def _the_json_line(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.splitlines()) == 1, proc.stdout  # `| jq` sees the result and nothing else
    return json.loads(proc.stdout)


def test_offline_commands_print_only_json_on_stdout(official_ckpt, tmp_path):
    result = _the_json_line(_run(["import-official", str(official_ckpt), str(tmp_path / "ours.pth")]))
    assert result["command"] == "import-official" and result["keys"] > 0
    result = _the_json_line(_run(["export", "--format", "detectron2", str(tmp_path / "ours.pth"),
                                  str(tmp_path / "d2.pkl")]))
    assert result["command"] == "export" and result["format"] == "detectron2"


@pytest.mark.slow
def test_knn_prints_only_json_on_stdout_and_logs_on_stderr(fm_shards, official_ckpt, tmp_path):
    out = tmp_path / "knn.json"
    proc = _run(["knn", "--checkpoint", str(official_ckpt), "--train-shards", str(fm_shards), "--val-shards",
                 str(fm_shards), "--k", "5", "--out", str(out), *LOADER])
    result = _the_json_line(proc)
    assert result["knn"]["5"]["top1"] > 30 and json.loads(out.read_text()) == result
    assert "INFO" in proc.stderr and "5-NN" in proc.stderr  # the logs went to stderr


@pytest.fixture
def broken_torch_save(tmp_path) -> dict[str, str]:
    """Environment for a subprocess in which torch.save fails unexpectedly (a `sitecustomize`)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch\n\n\ndef _broken(*args, **kwargs):\n"
        "    raise RuntimeError('simulated controller failure\\nsecond line of the message')\n\n\n"
        "torch.save = _broken\n")
    logs = tmp_path / "tmp"
    logs.mkdir()
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), "TMPDIR": str(logs),
            "HCSC_DEBUG": ""}


def test_unexpected_error_is_one_line_naming_the_log(official_ckpt, tmp_path, broken_torch_save):
    work = tmp_path / "work"
    work.mkdir()
    proc = _run(_export(official_ckpt, work / "tv.pth"), env=broken_torch_save)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "RuntimeError: simulated controller failure" in lines[0] and "second line" not in lines[0]
    log = Path(re.search(r"traceback in (\S+)\)", lines[0]).group(1))
    assert log.is_relative_to(tmp_path / "tmp") and log.is_file()
    text = log.read_text()
    assert "Traceback" in text and "second line of the message" in text and "_broken" in text
    assert list(work.iterdir()) == []  # no half-written output, no temporary file

    proc = _run(_export(official_ckpt, work / "tv.pth"), env={**broken_torch_save, "HCSC_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # asked for: on the console too
    assert proc.stderr.strip().splitlines()[-1].startswith("hcsc-eval export: failed: RuntimeError")


@pytest.mark.slow
def test_sigint_during_knn_is_one_line_and_writes_nothing(fm_shards, official_ckpt, tmp_path):
    out = tmp_path / "knn.json"
    args = ["knn", "--checkpoint", str(official_ckpt), "--train-shards", str(fm_shards), "--val-shards",
            str(fm_shards), "--out", str(out), *LOADER]
    proc = subprocess.Popen([str(HCSC_EVAL), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # the trunk is loaded: the command is at work
        seen.append(line)
        if "loaded resnet18_small trunk" in line:
            break
    proc.send_signal(signal.SIGINT)
    stdout, rest = proc.communicate(timeout=300)
    err = "".join(seen) + rest
    assert proc.returncode == 130, err
    assert stdout == "" and "Traceback" not in err
    last = [line for line in re.split(r"[\r\n]", err) if line.strip()][-1]
    assert last.startswith("hcsc-eval knn: interrupted;") and "half-written" in last
    assert list(tmp_path.iterdir()) == []
