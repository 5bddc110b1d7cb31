"""The training recipe. Each stage is a comment and one call into a package:
clustering when due -> learning rate -> batches through the engine -> log -> kNN monitor ->
checkpoint when due (and on SIGTERM/SIGINT, during training or clustering) -> final evaluation."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cluster.features import gather_by_idx, split_features
from cluster.hierarchy import hierarchical_kmeans
from core import dist, faults
from core.config import Config, global_batch, to_yaml
from core.errors import StopRequested
from core.logs import MetricsWriter, config_dict, progress, read_records, setup_logging
from model.checkpoint_io import official_state_dict
from model.hcsc import HCSC
from pipeline import build_loader
from train import checkpoint, monitor, preflight, records, rundir
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
    rundir.seed_everything(cfg.run.seed, per_rank=False)
    model = HCSC(cfg.model, cfg.hcsc, multi_crop=cfg.data.multi_crop)
    engine = Engine(model, cfg, lr=lr_at(cfg, 0, dist.world()))
    rundir.seed_everything(cfg.run.seed, per_rank=True)
    point = _resume(engine, inputs.resume_from)
    if point.epoch >= cfg.optim.epochs and read_records(run_dir, "final", since_step=point.global_step):
        log.info("run.output_dir=%s finished all %d epochs already; nothing to do (to train longer, "
                 "rerun with a larger optim.epochs)", run_dir, cfg.optim.epochs)
        return 0
    metrics = MetricsWriter(run_dir, wandb=cfg.run.wandb, config=config_dict(cfg))
    try:
        return _train(cfg, inputs, run_dir, engine, point, metrics)
    finally:
        metrics.close()


def _train(cfg: Config, inputs: preflight.RunInputs, run_dir: Path, engine: Engine,
           point: checkpoint.ResumePoint, metrics: MetricsWriter) -> int:
    stop = rundir.StopFlag()
    _start_summary(cfg, inputs, engine, point, metrics)
    if point.global_step == 0 and cfg.data.val_split:  # the untrained encoder, for comparison
        metrics.write("init", 0, monitor.evaluate(engine.module, cfg, epoch=0, with_nmi=True))
    eta = records.Eta(cfg.optim.epochs)
    for epoch in range(point.epoch, cfg.optim.epochs):
        epoch_start = time.perf_counter()
        # Clustering at the start of every epoch from the warm-up on (method.md §2.1); a mid-epoch
        # resume keeps the prototypes saved with the checkpoint.
        prototypes = point.prototypes if point.batch_in_epoch else None
        timings: dict[str, float] = {}
        if cfg.hcsc.enabled and epoch >= cfg.hcsc.warmup_epochs and prototypes is None:
            try:
                prototypes = _cluster(engine.module, cfg, epoch, inputs, point, metrics, timings,
                                      previous=point.prototypes, stop=stop)
            except StopRequested:  # minutes of clustering must not outlast the launcher's grace period
                _save(engine, cfg, point)  # the epoch's start: a resume clusters again
                log.info("stopped by %s during the clustering of epoch %d; resume with run.resume=auto",
                         stop.signal_name or "a signal to another rank", epoch)
                return 0
        point.prototypes = prototypes
        engine.set_lr(lr_at(cfg, epoch, dist.world()))
        meter = records.EpochMeter()
        stopped = _train_epoch(engine, cfg, epoch, point, stop, metrics, meter)
        if stopped or (epoch + 1) % cfg.run.checkpoint_every == 0 or epoch + 1 == cfg.optim.epochs:
            _save(engine, cfg, point)
        if stopped:
            log.info("stopped by %s at epoch %d batch %d; resume with run.resume=auto",
                     stop.signal_name or "a signal to another rank", point.epoch, point.batch_in_epoch)
            return 0
        if cfg.data.val_split and cfg.eval.knn_every and (epoch + 1) % cfg.eval.knn_every == 0:
            knn = monitor.evaluate(engine.module, cfg, epoch=epoch)
            metrics.write("knn", point.global_step, {"epoch": epoch, **knn})
            log.info("epoch %d kNN: %s", epoch, knn)
        _end_epoch(cfg, epoch, meter, timings, eta, time.perf_counter() - epoch_start, point, metrics)
    if cfg.data.val_split:
        final = monitor.evaluate(engine.module, cfg, epoch=cfg.optim.epochs, with_nmi=True)
        metrics.write("final", point.global_step, final)
        _log_final(final, read_records(run_dir, "init"))
    log.info("done: run directory %s (config.yaml, metrics.jsonl, logs/, tb/, checkpoints/)", run_dir)
    return 0


def _start_summary(cfg: Config, inputs: preflight.RunInputs, engine: Engine,
                   point: checkpoint.ResumePoint, metrics: MetricsWriter) -> None:
    """The `run` record and its log line, and the resolved config as TensorBoard text."""
    steps = inputs.train.num_samples // global_batch(cfg, dist.world())
    if cfg.run.max_steps_per_epoch:
        steps = min(steps, cfg.run.max_steps_per_epoch)
    lr = lr_at(cfg, point.epoch, dist.world())
    summary = records.run_summary(cfg, inputs, engine.module, steps, lr)
    metrics.write("run", point.global_step, summary)
    metrics.text("config", "```\n" + to_yaml(cfg) + "```")
    log.info("run: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


def _log_final(final: dict[str, float], init: list[dict]) -> None:
    """The final scores beside the same encoder's at initialisation (evaluated the same way)."""
    start = init[0] if init else {}
    parts = [f"{k}={v:.2f}" + (f" (at init {start[k]:.2f})" if isinstance(start.get(k), float) else "")
             for k, v in final.items()]
    log.info("final: " + " ".join(parts))


def _end_epoch(cfg: Config, epoch: int, meter: records.EpochMeter, timings: dict[str, float],
               eta: records.Eta, seconds: float, point: checkpoint.ResumePoint,
               metrics: MetricsWriter) -> None:
    record = meter.record(epoch, **timings)
    record["epoch_s"] = seconds
    record["eta_s"] = eta.after(epoch, seconds)
    metrics.write("epoch", point.global_step, record)
    log.info("epoch %d/%d: loss %.3f (inst %.3f, proto %.3f), %.0f images/s, data wait %.0f%%, %s; "
             "ETA %s", epoch + 1, cfg.optim.epochs, record["loss"], record["loss_inst"],
             record["loss_proto"], record["images_per_s"], 100 * record["data_wait"],
             records.format_duration(seconds), records.format_duration(record["eta_s"]))


def _resume(engine: Engine, path: Path | None) -> checkpoint.ResumePoint:
    if path is None:
        return checkpoint.ResumePoint()
    point, _ = checkpoint.load(engine, path, dist.device())
    return point


def _cluster(model, cfg: Config, epoch: int, inputs: preflight.RunInputs, point: checkpoint.ResumePoint,
             metrics: MetricsWriter, timings: dict[str, float], previous, stop: rundir.StopFlag):
    """Momentum-encoder features of the train split (exactly once across ranks) -> hierarchy, and
    its `cluster` records (with NMI and purity when the shards carry labels).

    Raises:
        StopRequested: on every rank when any rank got SIGTERM/SIGINT (asked after every feature
            batch and every level-1 k-means iteration)."""
    start = time.perf_counter()
    faults.clustering_starts(dist.rank(), epoch)
    model.eval()
    try:
        found = split_features(model.embed_momentum, cfg.data, cfg.data.train_split, epoch=epoch,
                               seed=cfg.run.seed, normalize=True, desc=f"features epoch {epoch}",
                               cluster=cfg.cluster, should_stop=stop.any_rank)
    finally:
        model.train()
    timings["features_s"] = time.perf_counter() - start
    prototypes = hierarchical_kmeans(found.idx, found.feats, num_samples=inputs.train.num_samples,
                                     num_clusters=cfg.hcsc.num_clusters, cfg=cfg.cluster,
                                     temperature=cfg.model.temperature, previous=previous,
                                     should_stop=stop.any_rank)
    timings["clustering_s"] = time.perf_counter() - start - timings["features_s"]
    labelled = inputs.train.num_classes > 1
    labels = gather_by_idx(found.idx, found.cls, found.num_samples) if labelled else None
    if dist.is_main():
        sizes = prototypes.cluster_sizes()
        for row in records.cluster_records(prototypes, sizes, labels, epoch=epoch, nredo=cfg.cluster.nredo):
            metrics.write("cluster", point.global_step, row, tag_suffix=f"/l{row['level']}")
        for level, level_sizes in enumerate(sizes, start=1):
            metrics.histogram(f"cluster_sizes/l{level}", level_sizes, epoch)
    log.info("epoch %d: features %.1fs, clustering %.1fs", epoch, timings["features_s"],
             timings["clustering_s"])
    return prototypes.to(dist.device())


def _train_epoch(engine: Engine, cfg: Config, epoch: int, point: checkpoint.ResumePoint,
                 stop: rundir.StopFlag, metrics: MetricsWriter, meter: records.EpochMeter) -> bool:
    """Run the epoch's batches from `point.batch_in_epoch`; True when stopped by a signal."""
    loader = build_loader(cfg.data, split=cfg.data.train_split, mode="train", rank=dist.rank(),
                          world=dist.world(), epoch=epoch, seed=cfg.run.seed,
                          start_batch=point.batch_in_epoch, device=dist.device())
    total = len(loader)
    if cfg.run.max_steps_per_epoch:
        total = min(total, cfg.run.max_steps_per_epoch)
    fault = faults.step_hook(dist.rank())  # None unless a crash test asks for one
    bar = progress(total=total, initial=point.batch_in_epoch, desc=f"epoch {epoch + 1}/{cfg.optim.epochs}")
    try:
        for k, batch in enumerate(loader, start=point.batch_in_epoch):
            if k >= total:
                break
            meter.data_ready()
            if point.global_step == 0:  # what the pipeline produces, once per run
                metrics.images("augmented_views", records.view_grid(batch.views), 0)
            log_step = (point.global_step + 1) % cfg.run.log_every == 0 or k + 1 == total
            out = engine.train_step(batch, point.prototypes, epoch, metrics=log_step)
            point.batch_in_epoch, point.global_step = k + 1, point.global_step + 1
            if fault is not None:
                fault(point.global_step)
            meter.step_done(out, len(batch) * dist.world())
            bar.update(1)
            if log_step:
                values = {n: float(v) for n, v in out.items()} | meter.throughput()
                values["lr"] = engine.optimizer.param_groups[0]["lr"]
                metrics.write("train", point.global_step, {"epoch": epoch, "batch": k, **values})
                bar.set_postfix(loss=f"{values['loss']:.3f}")
                if stop.any_rank():
                    return True
    finally:
        bar.close()
        loader.close()
    point.epoch, point.batch_in_epoch = epoch + 1, 0
    return False


def _save(engine: Engine, cfg: Config, point: checkpoint.ResumePoint) -> None:
    official = official_state_dict(engine.module) if dist.is_main() else None
    checkpoint.save(engine, cfg.run.output_dir, point, config_yaml=to_yaml(cfg),
                    keep_last=cfg.run.keep_last, official_state_dict=official)
