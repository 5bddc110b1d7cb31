"""DeepSpeed engine wrapper and atomic checkpoints, on a toy module with HCSC's shape
(a trained `encoder_q`, a frozen `encoder_k`, a queue buffer), in spawned gloo processes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.config import load_config
from train.engine import deepspeed_config

pytestmark = pytest.mark.dist


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder_q = nn.Linear(4, 3)
        self.encoder_k = nn.Linear(4, 3)
        self.encoder_k.requires_grad_(False)
        self.register_buffer("queue", torch.zeros(3, 8))

    def forward(self, batch, prototypes, *, epoch):
        out = self.encoder_q(batch)
        with torch.no_grad():
            self.queue[:, : batch.shape[0]] = self.encoder_k(batch).T  # state outside the optimizer
        return {"loss": (out - 1).pow(2).mean()}


def _batches(rank, n=6):
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(4, 4, generator=g) for _ in range(n)]


def _train_save_resume(run_dir: str, zero_stage: int):
    from core import dist
    from train import checkpoint
    from train.engine import Engine

    cfg = load_config(None, ["data.batch_size=4", "model.queue_size=8",
                             f"engine.zero_stage={zero_stage}", f"run.output_dir={run_dir}"])
    engine = Engine(Toy(), cfg, lr=0.1)
    batches = _batches(dist.rank())
    losses = [float(engine.train_step(b, None, 0)["loss"]) for b in batches[:3]]
    point = checkpoint.ResumePoint(epoch=0, batch_in_epoch=3, global_step=3)
    checkpoint.save(engine, run_dir, point, config_yaml="x: 1", keep_last=2)
    rest = [float(engine.train_step(b, None, 0)["loss"]) for b in batches[3:]]
    # A fresh engine (different init) resumed from the checkpoint continues identically.
    fresh = Toy()
    nn.init.constant_(fresh.encoder_q.weight, 5.0)
    engine2 = Engine(fresh, cfg, lr=0.1)
    path = checkpoint.resolve(run_dir, "auto")
    resumed_point, yaml = checkpoint.load(engine2, path, torch.device("cpu"))
    resumed = [float(engine2.train_step(b, None, 0)["loss"]) for b in batches[3:]]
    return {"losses": losses, "rest": rest, "resumed": resumed, "point": resumed_point.batch_in_epoch,
            "yaml": yaml, "queue_equal": torch.equal(engine.module.queue, engine2.module.queue)}


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_resume_continues_exactly_on_two_ranks(dist_run, tmp_path, zero_stage):
    results = dist_run(_train_save_resume, 2, str(tmp_path), zero_stage)
    for res in results:
        assert res["resumed"] == res["rest"]
        assert res["point"] == 3 and res["yaml"] == "x: 1" and res["queue_equal"]
    assert results[0]["losses"] != results[1]["losses"]  # ranks saw different data
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "epoch0000-batch000003"


def _killed_save(run_dir: str):
    from train import checkpoint
    from train.engine import Engine

    cfg = load_config(None, ["data.batch_size=4", "model.queue_size=8", f"run.output_dir={run_dir}"])
    engine = Engine(Toy(), cfg, lr=0.1)
    batch = _batches(0)[0]
    engine.train_step(batch, None, 0)
    checkpoint.save(engine, run_dir, checkpoint.ResumePoint(0, 1, 1), config_yaml="", keep_last=3)
    saved = engine.module.encoder_q.weight.clone()
    engine.train_step(batch, None, 0)
    real_save = engine.save

    def dies_half_way(folder, tag, client_state):
        real_save(folder, tag, client_state)  # files written under the temporary tag ...
        raise KeyboardInterrupt("killed during save")  # ... but never renamed or pointed to

    engine.save = dies_half_way
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(engine, run_dir, checkpoint.ResumePoint(0, 2, 2), config_yaml="", keep_last=3)
    engine.save = real_save
    point, _ = checkpoint.load(engine, checkpoint.resolve(run_dir, "auto"), torch.device("cpu"))
    restored = torch.equal(engine.module.encoder_q.weight, saved)
    # The next complete save clears the half-written folder.
    checkpoint.save(engine, run_dir, checkpoint.ResumePoint(0, 3, 3), config_yaml="", keep_last=3)
    return point.batch_in_epoch, restored


def test_kill_during_save_leaves_previous_checkpoint(dist_run, tmp_path):
    [(batch_in_epoch, restored)] = dist_run(_killed_save, 1, str(tmp_path))
    assert batch_in_epoch == 1 and restored
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["epoch0000-batch000001", "epoch0000-batch000003", "latest"]


def _full_disk_saves(run_dir: str):
    import shutil

    from core.runfolder import RunFolder
    from train import checkpoint
    from train.engine import Engine

    cfg = load_config(None, ["data.batch_size=4", "model.queue_size=8", f"run.output_dir={run_dir}"])
    engine = Engine(Toy(), cfg, lr=0.1)
    engine.train_step(_batches(0)[0], None, 0)
    checkpoint.save(engine, run_dir, checkpoint.ResumePoint(0, 1, 1), config_yaml="", keep_last=3)
    real_save = engine.save

    def disk_fills_up(folder, tag, client_state):
        real_save(folder, tag, client_state)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 100 vs 90")

    engine.save = disk_fills_up
    with pytest.raises(checkpoint.CheckpointWriteError) as failed:
        checkpoint.save(engine, run_dir, checkpoint.ResumePoint(0, 2, 2), config_yaml="", keep_last=3)
    engine.save = real_save
    after_failure = sorted(p.name for p in RunFolder.at(run_dir).checkpoints.iterdir())

    previous = RunFolder.at(run_dir).checkpoints / "epoch0000-batch000001"
    size = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file())
    real_usage = shutil.disk_usage
    checkpoint.shutil.disk_usage = lambda path: real_usage(path)._replace(free=size // 2)
    try:
        with pytest.raises(checkpoint.CheckpointWriteError) as refused:
            checkpoint.save(engine, run_dir, checkpoint.ResumePoint(0, 3, 3), config_yaml="", keep_last=3)
    finally:
        checkpoint.shutil.disk_usage = real_usage
    after_refusal = sorted(p.name for p in RunFolder.at(run_dir).checkpoints.iterdir())
    return str(failed.value), after_failure, str(refused.value), after_refusal


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(dist_run, tmp_path):
    [(failed, after_failure, refused, after_refusal)] = dist_run(_full_disk_saves, 1, str(tmp_path))
    kept = ["epoch0000-batch000001", "latest"]
    # The write error names the checkpoint, torch's reason and the way out, on one line, and the
    # half-written folder is gone at once.
    assert "\n" not in failed and "epoch0000-batch000002: writing the checkpoint failed" in failed
    assert "unexpected pos" in failed and "epoch0000-batch000001, is intact" in failed
    assert "run.resume=auto" in failed and after_failure == kept
    # With less room than the last checkpoint took, the save is refused before writing anything.
    assert "MiB free, but a checkpoint needs about" in refused and after_refusal == kept


def test_deepspeed_config_comes_from_the_schema():
    cfg = load_config(None, ["engine.zero_stage=1", "optim.grad_clip=3.0", "data.batch_size=16",
                             "model.queue_size=64"])
    ds = deepspeed_config(cfg, world=4)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["zero_optimization"] == {"stage": 1} and ds["gradient_clipping"] == 3.0
    assert "torch_autocast" not in ds and "fp16" not in ds and "bf16" not in ds


def test_mixed_precision_is_torch_autocast_with_fp32_gradient_reduction():
    ds = deepspeed_config(load_config(None, ["engine.precision=bf16", "engine.zero_stage=1"]), world=1)
    # No module tagged for bf16 communication: ZeRO-1 reduces every gradient in fp32.
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in ds and "fp16" not in ds


def test_deepspeed_never_synchronises_the_device_for_its_timers():
    ds = deepspeed_config(load_config(None, []), world=1)
    assert ds["timers"] == {"throughput": {"enabled": False, "synchronized": False}}
    assert ds["wall_clock_breakdown"] is False


class ToyBN(Toy):
    """The toy with BatchNorm in both encoders: running statistics that follow each rank's batches."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder_q = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
        self.encoder_k = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
        self.encoder_k.requires_grad_(False)


def _bn_buffers_after_steps(run_dir: str) -> dict:
    from core import dist
    from train import checkpoint
    from train.engine import Engine

    cfg = load_config(None, ["data.batch_size=4", "model.queue_size=8", f"run.output_dir={run_dir}"])
    engine = Engine(ToyBN(), cfg, lr=0.1)
    batches = _batches(dist.rank())  # other data on each rank
    straight = [float(engine.train_step(b, None, 0)["loss"]) for b in batches[:2]]
    buffers = {n: b.clone() for n, b in engine.module.named_buffers() if not n.startswith("queue")}
    checkpoint.save(engine, run_dir, checkpoint.ResumePoint(0, 2, 2), config_yaml="", keep_last=2)
    straight += [float(engine.train_step(b, None, 0)["loss"]) for b in batches[2:]]
    resumed_engine = Engine(ToyBN(), cfg, lr=0.1)
    checkpoint.load(resumed_engine, checkpoint.resolve(run_dir, "auto"), torch.device("cpu"))
    resumed = [float(resumed_engine.train_step(b, None, 0)["loss"]) for b in batches[2:]]
    return {"buffers": {n: b.numpy() for n, b in buffers.items()}, "straight": straight[2:],
            "resumed": resumed}


def test_batchnorm_buffers_are_the_same_on_every_rank_and_resume_exactly(dist_run, tmp_path):
    rank0, rank1 = dist_run(_bn_buffers_after_steps, 2, str(tmp_path))
    assert set(rank0["buffers"]) == {"encoder_q.0.running_mean", "encoder_q.0.running_var",
                                     "encoder_q.0.num_batches_tracked", "encoder_k.0.running_mean",
                                     "encoder_k.0.running_var", "encoder_k.0.num_batches_tracked"}
    for name, value in rank0["buffers"].items():
        assert (value == rank1["buffers"][name]).all(), name  # rank 0's statistics everywhere
    assert rank0["buffers"]["encoder_q.0.running_mean"].any()  # they did move
    for res in (rank0, rank1):  # the checkpoint holds every rank's state, so rank 1 resumes exactly too
        assert res["resumed"] == res["straight"]
