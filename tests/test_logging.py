"""Logging setup: stdout on rank 0, a file per rank, metrics.jsonl on rank 0."""

from __future__ import annotations

import json
import logging

from core.logs import MetricsWriter, setup_logging


def test_rank_files_and_stdout(tmp_path, capsys):
    setup_logging(tmp_path, rank=0)
    logging.getLogger("hcsc.test").info("hello from rank 0")
    setup_logging(tmp_path, rank=1)
    logging.getLogger("hcsc.test").info("hello from rank 1")
    logging.getLogger().handlers.clear()
    out = capsys.readouterr().out
    assert "hello from rank 0" in out and "hello from rank 1" not in out
    assert "hello from rank 0" in (tmp_path / "logs" / "rank0.log").read_text()
    rank1 = (tmp_path / "logs" / "rank1.log").read_text()
    assert "hello from rank 1" in rank1 and "[rank1]" in rank1


def test_metrics_jsonl_only_when_enabled(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.write("train", 3, {"loss": 1.5, "lr": 0.03, "bad": float("nan")})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "train" and records[0]["step"] == 3
    assert records[0]["loss"] == 1.5 and records[0]["bad"] is None
    other = tmp_path / "other"
    MetricsWriter(other, enabled=False).write("train", 1, {"loss": 1.0})
    assert not (other / "metrics.jsonl").exists()


def test_tensorboard_events_written(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    writer.write("train", 1, {"loss": 2.0})
    writer.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
