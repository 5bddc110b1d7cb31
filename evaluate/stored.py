"""The hierarchy a training run learned: the prototypes stored with one of our checkpoints.

Our DeepSpeed checkpoints keep, in ``mp_rank_00_model_states.pt`` (read with
``weights_only=True``), the whole HCSC module state under ``module`` and the client state of
`train.checkpoint`: ``epoch``, ``batch_in_epoch``, ``config_yaml`` and ``prototypes`` =
`Prototypes.state_dict()`, the clustering of the TRAINING split (``data.train_split``) computed at
the start of an epoch (docs/method.md §2.1, §2.5). ``im2cluster[l][idx]`` is the level-(l+1)
cluster of training sample ``idx``, and the centroids live in the momentum encoder's head space
(docs/method.md §2.2), so images are embedded here exactly as the trainer embedded them for that
clustering: ``HCSC.embed_momentum`` of the eval transform at the run's sizes.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from cluster.prototypes import Prototypes
from core.config import Config, ConfigError
from core.errors import first_line
from core.logs import progress
from core.runfolder import CONFIG_FILE, DS_MODEL_FILE, RunFolder
from evaluate.checkpoints import CheckpointError, resolve, torch_load
from pipeline.plan import load_shards
from shards.format import IMAGE_EXTS, ShardFormatError

log = logging.getLogger(__name__)

Embed = Callable[[torch.Tensor], torch.Tensor]
RECLUSTER = "pass --recluster --shards FOLDER to cluster a split's features with this checkpoint instead"


@dataclass
class StoredRun:
    """One of our checkpoints with the prototypes stored in it (see the module docstring).

    Attributes:
        file: the ``mp_rank_00_model_states.pt`` read.
        run: the run folder holding the checkpoint folder, if it is inside one.
        config_yaml, config: the run's resolved config (``RUN/config.yaml``, else the copy in the
            checkpoint).
        epoch, batch_in_epoch: where training continues from this checkpoint.
        global_step: optimizer steps done, when recorded.
        prototypes: the stored clustering (on the CPU).
        module: the HCSC module state.
    """

    file: Path
    run: RunFolder | None
    config_yaml: str
    config: Config
    epoch: int
    batch_in_epoch: int
    global_step: int | None
    prototypes: Prototypes
    module: dict[str, torch.Tensor]
    recorded_epoch: int | None = None  # the client state's own record of the prototypes' epoch

    @property
    def tag(self) -> str:
        return self.file.parent.name

    @property
    def prototypes_epoch(self) -> int:
        """The epoch at whose start the stored prototypes were computed."""
        if self.recorded_epoch is not None:
            return self.recorded_epoch
        return prototypes_epoch(self.epoch, self.batch_in_epoch)


def prototypes_epoch(epoch: int, batch_in_epoch: int) -> int:
    """The epoch whose prototypes a checkpoint at (`epoch`, `batch_in_epoch`) holds.

    `train.loop` saves at the end of epoch E as (E + 1, batch 0) and when stopped mid-epoch as
    (E, k > 0); both keep the prototypes computed at the start of epoch E (docs/method.md §2.1: a
    resume at an epoch boundary clusters afresh, so the next epoch's prototypes are never saved
    at batch 0).
    """
    return epoch - 1 if batch_in_epoch == 0 else epoch


def model_file(checkpoint: str | os.PathLike) -> Path:
    """The DeepSpeed model-state file of a run folder, a checkpoint folder or that file itself.

    Raises:
        CheckpointError: another kind of checkpoint (official or exported weights keep no
            prototypes), named with the fix.
    """
    file = resolve(checkpoint)
    if file.name != DS_MODEL_FILE:
        raise CheckpointError(f"{checkpoint}: {file.name} holds weights only, no prototypes of a training "
                              "run (only our run folders and checkpoint folders keep them, in "
                              f"{DS_MODEL_FILE}); {RECLUSTER}")
    return file


def parse_config(text: str, where: str) -> Config:
    """The run's `Config` from its resolved YAML; one-line CheckpointError naming `where`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(text))
        return cast(Config, OmegaConf.to_object(merged))
    except (OmegaConfBaseException, ConfigError, ValueError) as err:
        raise CheckpointError(f"{where}: the run's config cannot be read ({first_line(err)})") from None


def load_stored(checkpoint: str | os.PathLike) -> StoredRun:
    """Read the checkpoint's module state, client state and the run's config.

    Raises:
        CheckpointError: not one of our checkpoints, no prototypes in it (warm-up, plain MoCo),
            or a malformed client state; one line each, with what to pass instead.
    """
    file = model_file(checkpoint)
    obj = torch_load(file)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("module"), Mapping):
        raise CheckpointError(f"{file}: not a DeepSpeed model state of our trainer (no 'module' dict); "
                              f"{RECLUSTER}")
    run = RunFolder.of_checkpoint(file.parent)
    if run is not None and run.config.is_file():
        text, where = run.config.read_text(), str(run.config)
    elif isinstance(obj.get("config_yaml"), str):
        text, where = obj["config_yaml"], f"{file} (config_yaml)"
    else:
        raise CheckpointError(f"{file}: neither {CONFIG_FILE} beside checkpoints/ nor a stored config_yaml; "
                              "the report needs the run's data and model settings")
    config = parse_config(text, where)
    epoch, batch = obj.get("epoch"), obj.get("batch_in_epoch")
    if not isinstance(epoch, int) or not isinstance(batch, int):
        raise CheckpointError(f"{file}: no integer epoch / batch_in_epoch in the client state; not a "
                              f"checkpoint of this trainer? {RECLUSTER}")
    state = obj.get("prototypes")
    if state is None:
        raise CheckpointError(f"{file}: no prototypes stored ({_why_none(config, epoch, batch)}); pass a "
                              f"later checkpoint of the run, or {RECLUSTER}")
    protos = _prototypes(state, file)
    step = obj.get("global_step")
    recorded = obj.get("prototypes_epoch")
    module = {k.removeprefix("module."): v for k, v in obj["module"].items() if isinstance(v, torch.Tensor)}
    return StoredRun(file, run, text, config, epoch, batch, step if isinstance(step, int) else None, protos,
                     module, recorded if isinstance(recorded, int) else None)


def _why_none(config: Config, epoch: int, batch: int) -> str:
    if not config.hcsc.enabled:
        return "the run trains plain MoCo v2, hcsc.enabled=false, and never clusters"
    if prototypes_epoch(epoch, batch) < config.hcsc.warmup_epochs:
        return (f"saved at epoch {epoch}, batch {batch}, still in the warm-up: the run clusters from epoch "
                f"hcsc.warmup_epochs={config.hcsc.warmup_epochs} on")
    return f"saved at epoch {epoch}, batch {batch}"


def _prototypes(state: object, file: Path) -> Prototypes:
    """`Prototypes.from_state_dict` with the shapes checked, so a damaged entry fails in one line."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{file}: 'prototypes' is a {type(state).__name__}, expected a dict of tensor "
                              "lists")
    lists = [state.get(name, []) for name in ("im2cluster", "centroids", "cluster2cluster")]
    if not all(isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v) for v in lists):
        raise CheckpointError(f"{file}: the stored prototypes are not lists of tensors; {RECLUSTER}")
    protos = Prototypes.from_state_dict(dict(state)).to("cpu")
    if not _consistent(protos):
        raise CheckpointError(f"{file}: the stored prototypes are malformed (levels, assignments and "
                              f"centroids do not fit together); {RECLUSTER}")
    return protos


def _consistent(protos: Prototypes) -> bool:
    """Levels, assignments, centroids and parent maps fit together (an assignment indexes its
    level's centroids, a parent map the next level's), so the report can index without checks."""
    levels = protos.num_levels
    if not (levels >= 1 and len(protos.im2cluster) == levels and len(protos.cluster2cluster) == levels - 1):
        return False
    dim = protos.centroids[0].shape[-1]
    if any(c.ndim != 2 or c.shape[0] < 1 or c.shape[1] != dim for c in protos.centroids):
        return False
    counts = [c.shape[0] for c in protos.centroids]
    samples = int(protos.im2cluster[0].numel())

    def ids(a: torch.Tensor, length: int, bound: int) -> bool:
        return (a.ndim == 1 and not a.is_floating_point() and a.numel() == length > 0
                and int(a.min()) >= 0 and int(a.max()) < bound)

    return (all(ids(a, samples, m) for a, m in zip(protos.im2cluster, counts, strict=True))
            and all(ids(p, counts[lvl], counts[lvl + 1]) for lvl, p in enumerate(protos.cluster2cluster)))


def momentum_embedder(stored: StoredRun, device: torch.device) -> Embed:
    """``HCSC.embed_momentum`` of the checkpoint's weights, in eval mode: the function the trainer
    clustered with (docs/method.md §2.2)."""
    from model.hcsc import HCSC

    cfg = stored.config
    model = HCSC(cfg.model, cfg.hcsc, multi_crop=cfg.data.multi_crop)
    ours = model.state_dict()
    missing = sorted(set(ours) - set(stored.module))
    unexpected = sorted(set(stored.module) - set(ours))
    shapes = [k for k in set(ours) & set(stored.module) if ours[k].shape != stored.module[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{stored.file}: the module state does not fit the run's config (model.encoder "
                              f"{cfg.model.encoder!r}, model.dim {cfg.model.dim}): {len(missing)} missing "
                              f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(shapes)} "
                              f"of another shape {shapes[:3]}")
    model.load_state_dict(stored.module)
    model.eval().requires_grad_(False).to(device)
    return model.embed_momentum


def scan_split(shards: str | os.PathLike, split: str, num_samples: int, wanted: np.ndarray, *, embed: Embed,
               transform: Callable[[Image.Image], torch.Tensor], labels: bool, batch_size: int, workers: int,
               device: torch.device) -> tuple[np.ndarray | None, torch.Tensor]:
    """One pass over the split's tars: every sample's class id, and the embeddings of `wanted`.

    The sample key is the 12-digit idx (shard format contract), so a member is selected by its
    name and only the wanted images are decoded; the ``cls`` members are 10 bytes each.

    Args:
        wanted: sorted dataset indices to embed.
        embed: images (B, 3, H, W) on `device` -> embeddings (B, d).
        transform: PIL image -> tensor (the eval transform).
        labels: read the class ids (the split is labelled).
        workers: decoding threads (PIL releases the GIL while decoding).

    Returns:
        (class id per dataset index or None, float32 embeddings (len(wanted), d) in `wanted` order).

    Raises:
        ShardFormatError: an image or class id missing from the tars, or an undecodable image.
    """
    row_of = {int(i): r for r, i in enumerate(wanted.tolist())}
    cls = np.full(num_samples, -1, dtype=np.int64) if labels else None
    rows: list[int] = []
    feats: list[torch.Tensor] = []
    pending: list[tuple[int, bytes]] = []
    tars, _ = load_shards(shards, split)

    def decode(item: tuple[int, bytes]) -> torch.Tensor:
        idx, data = item
        try:
            with Image.open(io.BytesIO(data)) as img:
                return transform(img.convert("RGB"))
        except Exception as err:  # PIL raises many types for bad bytes; all mean "corrupt"
            raise ShardFormatError(f"{shards}: image idx {idx} of split {split!r} cannot be decoded "
                                   f"({type(err).__name__}); check with `hcsc-shards verify`") from None

    bar = progress(total=len(row_of), desc=f"embedding {split} images")
    with ThreadPoolExecutor(max(1, workers)) as pool, torch.no_grad():
        def flush() -> None:
            if not pending:
                return
            batch = torch.stack(list(pool.map(decode, pending))).to(device)
            out = embed(batch).float().cpu()
            if not bool(torch.isfinite(out).all()):
                bad = int((~torch.isfinite(out)).any(1).sum())
                raise ValueError(f"{bad} embeddings are NaN or infinite; check the checkpoint")
            rows.extend(row_of[i] for i, _ in pending)
            feats.append(out)
            bar.update(len(pending))
            pending.clear()

        try:
            for shard in tars:
                with tarfile.open(shard.tar) as tar:
                    for member in tar:
                        key, _, ext = member.name.rpartition("/")[2].partition(".")
                        if not key.isdigit():
                            continue
                        idx = int(key)
                        if ext == "cls" and cls is not None and 0 <= idx < num_samples:
                            cls[idx] = int(_read(tar, member))
                        elif ext in IMAGE_EXTS and idx in row_of:
                            pending.append((idx, _read(tar, member)))
                            if len(pending) >= batch_size:
                                flush()
            flush()
        finally:
            bar.close()
    if len(rows) != len(row_of) or (cls is not None and bool((cls < 0).any())):
        lost = len(row_of) - len(set(rows)) + (int((cls < 0).sum()) if cls is not None else 0)
        raise ShardFormatError(f"{shards}: {lost} samples of split {split!r} missing from its tars; check "
                               "with `hcsc-shards verify`")
    dim = feats[0].shape[1] if feats else 0
    out = torch.zeros(len(row_of), dim)
    if feats:
        out[torch.tensor(rows)] = torch.cat(feats)
    return cls, out


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    file = tar.extractfile(member)
    assert file is not None  # shard members are regular files (format contract)
    return file.read()
