"""The benches' bookkeeping, without running a bench: the code key follows the working tree, a stored
result is current only for the key it was measured with, a stale one is never shown unmarked, and
the quality bench's held-out split, spread and stale handling behave."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    """Load a bench file as a module without putting bench/ on sys.path (where bench/pipeline.py
    would hide the pipeline package for every later test)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


common = _load("_common", ROOT / "bench" / "_common.py")  # the name bench/quality.py imports
quality = _load("bench_quality", ROOT / "bench" / "quality.py")


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    for name, text in {"core/a.py": "A = 1\n", "core/notes.txt": "n\n", "other/c.py": "C = 1\n",
                       "cfg.yaml": "lr: 1\n", ".gitignore": "core/ignored.py\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "init")
    return tmp_path


def _key(root: Path, extra=None) -> str:
    return common.code_key(["core"], ["cfg.yaml"], extra=extra or {"x": 1}, root=root)


def test_code_key_follows_uncommitted_edits_of_the_covered_files(repo):
    k0 = _key(repo)
    assert _key(repo) == k0 and len(k0) == 64
    (repo / "core/a.py").write_text("A = 2\n")  # not committed: the key must still change
    k1 = _key(repo)
    assert k1 != k0
    (repo / "core/a.py").write_text("A = 1\n")
    assert _key(repo) == k0
    (repo / "cfg.yaml").write_text("lr: 2\n")
    assert _key(repo) != k0
    (repo / "cfg.yaml").write_text("lr: 1\n")
    assert _key(repo, {"x": 2}) != k0  # the settings are part of it


def test_code_key_ignores_what_it_does_not_cover(repo):
    k0 = _key(repo)
    (repo / "core/notes.txt").write_text("changed\n")  # not .py
    (repo / "other/c.py").write_text("C = 2\n")  # outside the folders
    (repo / "core/ignored.py").write_text("X = 1\n")  # git-ignored
    assert _key(repo) == k0


def test_code_key_sees_new_moved_and_deleted_modules(repo):
    k0 = _key(repo)
    (repo / "core/new.py").write_text("N = 1\n")  # untracked, not ignored: tracked code may import it
    k_new = _key(repo)
    assert k_new != k0
    (repo / "core/new.py").unlink()
    (repo / "core/b.py").write_text("A = 1\n")  # the same contents under another name
    (repo / "core/a.py").unlink()  # deleted but still tracked
    k_moved = _key(repo)
    assert k_moved not in (k0, k_new)


def test_code_key_outside_a_git_checkout(tmp_path):
    (tmp_path / "core" / "__pycache__").mkdir(parents=True)
    (tmp_path / "core/a.py").write_text("A = 1\n")
    (tmp_path / "cfg.yaml").write_text("lr: 1\n")
    k0 = _key(tmp_path)
    (tmp_path / "core/__pycache__/a.cpython.py").write_text("junk")
    assert _key(tmp_path) == k0
    (tmp_path / "core/a.py").write_text("A = 2\n")
    assert _key(tmp_path) != k0


def test_result_file_is_current_only_for_its_key(tmp_path):
    store = common.ResultFile(tmp_path / "r.json")
    assert store.status("k" * 64) == "missing"
    assert "no stored result" in store.describe("k" * 64)
    with pytest.raises(ValueError, match="code key"):
        store.write({"bench": "x"})
    store.write({"bench": "x", "key": "a" * 64, "key_at_end": "a" * 64})
    assert store.read()["written"]
    assert store.status("a" * 64) == "current"
    assert store.describe("a" * 64).startswith(f"{tmp_path / 'r.json'}: CURRENT")
    assert store.status("b" * 64) == "stale"
    text = store.describe("b" * 64)
    assert "STALE" in text and "a" * 16 in text and "b" * 16 in text and "rerun" in text


def test_a_result_whose_code_changed_during_the_run_is_never_current(tmp_path):
    store = common.ResultFile(tmp_path / "r.json")
    store.write({"key": "a" * 64, "key_at_end": "c" * 64})
    assert store.status("a" * 64) == "stale"
    assert store.status("c" * 64) == "stale"
    assert "changed while it ran" in store.describe("a" * 64)


def test_machine_and_command(monkeypatch):
    host = common.machine()
    assert host["cpu_model"] and host["cores"] >= 1 and len(host["load_avg_start"]) == 3
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "pipeline.py"), "--full", "--workers", "2"])
    assert common.command().endswith("bench/pipeline.py --full --workers 2")


def test_contiguous_shares_cover_every_file_once():
    for n, parts in [(10, 3), (5000, 2), (1, 2), (7, 7)]:
        shares = common.contiguous_shares(n, parts)
        assert len(shares) == parts
        covered = [i for a, b in shares for i in range(a, b)]
        assert covered == list(range(n))
        assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


def test_data_config_overrides_and_unknown_keys():
    cfg = common.data_config(["data.blur=false"], image_size=64, workers=3)
    assert (cfg.blur, cfg.image_size, cfg.workers) == (False, 64, 3)
    with pytest.raises(common.UnknownKey, match="no_such_flag"):
        common.data_config(["data.no_such_flag=true"])
    from core.config import DataConfig

    if "fast_augment" in DataConfig.__dataclass_fields__:  # the flag another change adds
        assert common.data_config(["data.fast_augment=true"]).fast_augment is True
    else:
        with pytest.raises(common.UnknownKey):
            common.data_config(["data.fast_augment=true"])


# ---------------------------------------------------------------------------------------------
# bench/quality.py


def test_holdout_is_a_fixed_part_of_the_training_split():
    mask = quality.holdout_mask(1000, 0.1)
    assert mask.shape == (1000,) and mask.sum() == 100
    assert (quality.holdout_mask(1000, 0.1) == mask).all()  # same images for every method and seed
    assert 0 < quality.holdout_mask(3, 0.9).sum() < 3  # never all, never none


def _rows() -> list[dict]:
    rows = []
    for seed, (h, m, r) in enumerate([(80.0, 79.0, 70.0), (82.0, 83.0, 71.0)]):
        for method, knn in (("hcsc", h), ("moco", m), ("random-init", r)):
            rows.append({"method": method, "seed": seed, "train_wall_s": 10.0, "train_cpu_s": 9.0,
                         "knn_top1": knn, "linear_top1": knn - 1, "linear_epoch": 3, "nmi": knn / 100})
    return rows


def test_summary_gives_the_spread_and_the_paired_differences():
    summary = quality.summarize(_rows())
    assert summary["hcsc"]["knn_top1"] == {"mean": 81.0, "sd": 1.4142, "min": 80.0, "max": 82.0, "n": 2}
    assert summary["hcsc_minus_moco"]["knn_top1"]["per_seed"] == [1.0, -1.0]
    assert summary["hcsc_minus_moco"]["knn_top1"]["mean"] == 0.0
    one = quality.summarize([r for r in _rows() if r["seed"] == 0])
    assert one["moco"]["nmi"]["sd"] is None  # no spread from one seed, not a made-up zero


def _record(key: str) -> dict:
    settings = {**quality.MODES["quick"], "epochs": 2, "parallel": False}
    rows = _rows()
    return {"bench": "quality", "name": "quality-quick", "mode": "quick", "key": key, "key_at_end": key,
            "settings": settings, "rows": rows, "summary": quality.summarize(rows), "command": "c",
            "machine": {}, "wall_s": 1.0, "cpu_s": 1.0, "seeds": [0, 1]}


def test_a_stale_record_is_printed_marked_on_every_line():
    record = _record("a" * 64)
    stale = quality.table(record, "stale")
    assert stale and all(line.startswith("STALE | ") for line in stale)
    assert any("a" * 16 in line for line in stale)  # with its key
    assert not any(line.startswith("STALE") for line in quality.table(record, "current"))
    head = quality.headline(record)
    assert head["ours"] == 81.0 and head["baseline"] == 81.0 and head["equal_work"] is True
    assert head["baseline_desc"] and head["key"] == "a" * 64


def test_a_mode_with_changed_settings_is_recorded_apart():
    settings, name = quality.resolve_settings("quick", {"epochs": None, "parallel": False})
    assert name == "quality-quick" and settings["epochs"] == quality.MODES["quick"]["epochs"]
    same, name = quality.resolve_settings("quick", {"epochs": quality.MODES["quick"]["epochs"]})
    assert name == "quality-quick" and same == settings
    custom, name = quality.resolve_settings("quick", {"epochs": 7})
    assert name == "quality-custom" and custom["epochs"] == 7
    assert quality.quality_key(custom) != quality.quality_key(settings)


def _main(monkeypatch, tmp_path, *argv: str) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(quality, "WORK", tmp_path / "work")

    def no_training(*args, **kwargs):
        raise AssertionError("the bench started work it should not have")

    monkeypatch.setattr(quality, "build_shards", no_training)
    monkeypatch.setattr(sys, "argv", ["bench/quality.py", *argv])
    quality.main()


def test_quality_status_marks_a_stale_record_and_prints_no_headline(monkeypatch, tmp_path, capsys):
    common.ResultFile(tmp_path / "quality-quick.json").write(_record("0" * 64))
    _main(monkeypatch, tmp_path, "--status")
    out = capsys.readouterr().out.splitlines()
    assert "STALE" in out[0] and "0" * 16 in out[0]
    assert all(line.startswith("STALE | ") for line in out[1:])
    assert not any(line.startswith("{") for line in out)  # no JSON line a script could take as current


def test_quality_reuses_a_current_record_without_training(monkeypatch, tmp_path, capsys):
    settings, _ = quality.resolve_settings("quick", {})
    common.ResultFile(tmp_path / "quality-quick.json").write(_record(quality.quality_key(settings)))
    _main(monkeypatch, tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert "CURRENT" in out[0] and not any("STALE" in line for line in out)
    assert json.loads(out[-1])["bench"] == "quality_fmnist_knn_top1"


def test_quality_reruns_a_stale_record(monkeypatch, tmp_path, capsys):
    common.ResultFile(tmp_path / "quality-quick.json").write(_record("0" * 64))
    with pytest.raises(AssertionError, match="should not have"):  # it went on to build shards
        _main(monkeypatch, tmp_path)
    out = capsys.readouterr().out
    assert "STALE: rerunning" in out


class _FakeBench:
    def __init__(self, *args) -> None:
        self.reused: list[str] = []


def _fake_run(monkeypatch, tmp_path, keys: list[str]) -> None:
    """main() with training replaced by the rows of `_rows()`; quality_key returns `keys` in turn
    (at the start of the run, then at its end)."""
    sequence = iter(keys)
    monkeypatch.setattr(quality, "quality_key", lambda settings: next(sequence))
    monkeypatch.setattr(quality, "build_shards", lambda *a: tmp_path / "shards")
    monkeypatch.setattr(quality, "Bench", _FakeBench)
    monkeypatch.setattr(quality, "run_seed",
                        lambda bench, seed, parallel: [r for r in _rows() if r["seed"] == seed])
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(quality, "WORK", tmp_path / "work")
    monkeypatch.setattr(sys, "argv", ["bench/quality.py"])
    quality.main()


def test_a_finished_run_is_stored_current_with_its_record(monkeypatch, tmp_path, capsys):
    _fake_run(monkeypatch, tmp_path, ["1" * 64, "1" * 64])
    out = capsys.readouterr().out.splitlines()
    stored = json.loads((tmp_path / "quality-quick.json").read_text())
    assert stored["key"] == stored["key_at_end"] == "1" * 64
    assert stored["command"] and stored["machine"]["cpu_model"] and stored["seeds"] == [0, 1]
    assert stored["wall_s"] >= 0 and stored["cpu_s"] >= 0 and len(stored["rows"]) == 6
    assert json.loads(out[-1])["ours"] == 81.0


def test_a_run_during_which_the_code_changed_is_stored_stale(monkeypatch, tmp_path, capsys):
    _fake_run(monkeypatch, tmp_path, ["1" * 64, "2" * 64])
    out = capsys.readouterr().out.splitlines()
    stored = json.loads((tmp_path / "quality-quick.json").read_text())
    assert (stored["key"], stored["key_at_end"]) == ("1" * 64, "2" * 64)
    assert common.ResultFile(tmp_path / "quality-quick.json").status("2" * 64) == "stale"
    assert any(line.startswith("STALE | hcsc") for line in out)
    assert not any(line.startswith("{") for line in out)  # no headline to take as current


def test_record_run_stores_the_key_and_says_whether_the_code_held_still(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    code = ([], ["bench/_common.py"])  # no folders: only the named file (not the whole repository)
    now = common.code_key(*code, extra={"n": 1})
    assert common.record_run("b", now, code, {"n": 1}, {"records": [1]})
    stored = json.loads((tmp_path / "b.json").read_text())
    assert stored["key"] == stored["key_at_end"] == now and stored["records"] == [1]
    assert not common.record_run("b", "0" * 64, code, {"n": 1}, {"records": [2]})
    assert "STALE" in capsys.readouterr().out
    assert common.ResultFile(tmp_path / "b.json").status(now) == "stale"
