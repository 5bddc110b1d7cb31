"""The training recipe. Each stage is a comment and one call into a package:
clustering when due -> learning rate -> batches through the engine -> log -> kNN monitor ->
checkpoint when due (and on SIGTERM/SIGINT) -> final evaluation."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from cluster.features import split_features
from cluster.hierarchy import hierarchical_kmeans
from core import dist, faults
from core.config import Config, to_yaml
from core.logs import MetricsWriter, progress, setup_logging
from core.runfolder import RunFolder
from model.checkpoint_io import official_state_dict
from model.hcsc import HCSC
from pipeline import build_loader
from train import checkpoint, monitor, preflight, rundir
from train.engine import Engine, prepare_environment
from train.schedule import lr_at

log = logging.getLogger(__name__)


def run(cfg: Config) -> int:
    """Train per `cfg`; returns the process exit code.

    Raises:
        PreflightError, RunDirError: a mistake found before any work (every rank raises it).
    """
    prepare_environment()
    dist.init(timeout_s=cfg.engine.collective_timeout_s)
    setup_logging(None)  # the console only, until the run folder is taken
    rundir.stop_with_launcher()
    inputs = preflight.check(cfg)  # before anything is written
    run_dir = rundir.prepare(cfg)
    try:
        return _run(cfg, inputs, run_dir)
    finally:
        rundir.release()


def _run(cfg: Config, inputs: preflight.RunInputs, run_dir: Path) -> int:
    setup_logging(run_dir)
    log.info("rank %d of %d on %s; a dead rank fails the others' collectives after %ss "
             "(engine.collective_timeout_s)", dist.rank(), dist.world(), dist.device(),
             cfg.engine.collective_timeout_s)
    metrics = MetricsWriter(run_dir)
    rundir.seed_everything(cfg.run.seed, per_rank=False)
    model = HCSC(cfg.model, cfg.hcsc, multi_crop=cfg.data.multi_crop)
    engine = Engine(model, cfg, lr=lr_at(cfg, 0, dist.world()))
    rundir.seed_everything(cfg.run.seed, per_rank=True)
    point = _resume(engine, inputs.resume_from)
    if point.epoch >= cfg.optim.epochs and _has_final_record(run_dir, point.global_step):
        log.info("run.output_dir=%s finished all %d epochs already; nothing to do (to train longer, "
                 "rerun with a larger optim.epochs)", run_dir, cfg.optim.epochs)
        return 0
    stop = rundir.StopFlag()
    num_samples = inputs.train.num_samples
    for epoch in range(point.epoch, cfg.optim.epochs):
        # Clustering at the start of every epoch from the warm-up on (method.md §2.1); a mid-epoch
        # resume keeps the prototypes saved with the checkpoint.
        prototypes = point.prototypes if point.batch_in_epoch else None
        if cfg.hcsc.enabled and epoch >= cfg.hcsc.warmup_epochs and prototypes is None:
            prototypes = _cluster(engine.module, cfg, epoch, num_samples, previous=point.prototypes)
        point.prototypes = prototypes
        engine.set_lr(lr_at(cfg, epoch, dist.world()))
        stopped = _train_epoch(engine, cfg, epoch, point, stop, metrics)
        if stopped or (epoch + 1) % cfg.run.checkpoint_every == 0 or epoch + 1 == cfg.optim.epochs:
            _save(engine, cfg, point)
        if stopped:
            log.info("stopped by %s at epoch %d batch %d; resume with run.resume=auto",
                     stop.signal_name or "signal", point.epoch, point.batch_in_epoch)
            return 0
        if cfg.data.val_split and cfg.eval.knn_every and (epoch + 1) % cfg.eval.knn_every == 0:
            knn = monitor.evaluate(engine.module, cfg, epoch=epoch)
            metrics.write("knn", point.global_step, {"epoch": epoch, **knn})
            log.info("epoch %d kNN: %s", epoch, knn)
    if cfg.data.val_split:
        final = monitor.evaluate(engine.module, cfg, epoch=cfg.optim.epochs, with_nmi=True)
        metrics.write("final", point.global_step, final)
        log.info("final: " + " ".join(f"{k}={v:.2f}" for k, v in final.items()))
    metrics.close()
    log.info("done: run directory %s (config.yaml, metrics.jsonl, logs/, tb/, checkpoints/)", run_dir)
    return 0


def _has_final_record(run_dir: Path, step: int) -> bool:
    """Whether metrics.jsonl holds the final evaluation of the training that ended at `step`."""
    path = RunFolder.at(run_dir).metrics
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if record.get("kind") == "final" and record.get("step", -1) >= step:
            return True
    return False


def _resume(engine: Engine, path: Path | None) -> checkpoint.ResumePoint:
    if path is None:
        return checkpoint.ResumePoint()
    point, _ = checkpoint.load(engine, path, dist.device())
    return point


def _cluster(model, cfg: Config, epoch: int, num_samples: int, previous):
    """Momentum-encoder features of the train split (exactly once across ranks) -> hierarchy."""
    start = time.time()
    model.eval()
    try:
        found = split_features(model.embed_momentum, cfg.data, cfg.data.train_split, epoch=epoch,
                               seed=cfg.run.seed, normalize=True, desc=f"features epoch {epoch}")
    finally:
        model.train()
    prototypes = hierarchical_kmeans(found.idx, found.feats, num_samples=num_samples,
                                     num_clusters=cfg.hcsc.num_clusters, cfg=cfg.cluster,
                                     temperature=cfg.model.temperature, previous=previous)
    log.info("epoch %d: clustering took %.1fs", epoch, time.time() - start)
    return prototypes.to(dist.device())


def _train_epoch(engine: Engine, cfg: Config, epoch: int, point: checkpoint.ResumePoint,
                 stop: rundir.StopFlag, metrics: MetricsWriter) -> bool:
    """Run the epoch's batches from `point.batch_in_epoch`; True when stopped by a signal."""
    loader = build_loader(cfg.data, split=cfg.data.train_split, mode="train", rank=dist.rank(),
                          world=dist.world(), epoch=epoch, seed=cfg.run.seed,
                          start_batch=point.batch_in_epoch, device=dist.device())
    total = len(loader)
    if cfg.run.max_steps_per_epoch:
        total = min(total, cfg.run.max_steps_per_epoch)
    meter = _Throughput()
    fault = faults.step_hook(dist.rank())  # None unless a crash test asks for one
    bar = progress(total=total, initial=point.batch_in_epoch, desc=f"epoch {epoch}")
    try:
        for k, batch in enumerate(loader, start=point.batch_in_epoch):
            if k >= total:
                break
            meter.data_ready()
            out = engine.train_step(batch, point.prototypes, epoch)
            point.batch_in_epoch, point.global_step = k + 1, point.global_step + 1
            if fault is not None:
                fault(point.global_step)
            meter.step_done(len(batch) * dist.world())
            bar.update(1)
            if point.global_step % cfg.run.log_every == 0 or k + 1 == total:
                values = {n: float(v) for n, v in out.items()} | meter.summary()
                values["lr"] = engine.optimizer.param_groups[0]["lr"]
                metrics.write("train", point.global_step, {"epoch": epoch, "batch": k, **values})
                bar.set_postfix(loss=f"{values['loss']:.3f}")
                if stop.any_rank():
                    return True
    finally:
        bar.close()
        loader.close()
    point.epoch, point.batch_in_epoch = epoch + 1, 0
    log.info("epoch %d done: %s", epoch, " ".join(f"{k}={v:.3g}" for k, v in meter.summary().items()))
    return False


def _save(engine: Engine, cfg: Config, point: checkpoint.ResumePoint) -> None:
    official = official_state_dict(engine.module) if dist.is_main() else None
    checkpoint.save(engine, cfg.run.output_dir, point, config_yaml=to_yaml(cfg),
                    keep_last=cfg.run.keep_last, official_state_dict=official)


class _Throughput:
    """Images/s and the fraction of wall time spent waiting for data."""

    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.wait = 0.0
        self.images = 0

    def data_ready(self) -> None:
        now = time.perf_counter()
        self.wait += now - self.mark

    def step_done(self, images: int) -> None:
        if torch.cuda.is_available():  # so the wait for the next batch is not hidden GPU work
            torch.cuda.synchronize()
        self.images += images
        self.mark = time.perf_counter()

    def summary(self) -> dict[str, float]:
        elapsed = max(self.mark - self.start, 1e-9)
        return {"images_per_s": self.images / elapsed, "data_wait": self.wait / elapsed}
