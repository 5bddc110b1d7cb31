"""Linear probe (method.md §7.1 protocol) on toy features: it learns, it resumes exactly, ranks agree."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evaluate.linear import STATE_FILE, LinearConfig, accuracy_counts, make_classifier, train_linear

CLASSES, DIM = 4, 32


def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly separable: each class is a noisy copy of one of 4 orthogonal directions."""
    centers = torch.eye(DIM)[:CLASSES] * 2
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return centers[labels] + 0.3 * torch.randn(n, DIM, generator=g), labels


TRAIN, VAL = _toy(512, 0), _toy(256, 1)


def _batches(part: int = 0, parts: int = 1, batch: int = 64, fail_at: int | None = None):
    """(epoch) -> shuffled batches of the toy train set, this rank's `part` of each global batch."""

    def gen(epoch: int):
        if epoch == fail_at:
            raise KeyboardInterrupt("simulated kill")
        order = torch.randperm(len(TRAIN[1]), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order), batch):
            rows = order[start:start + batch].tensor_split(parts)[part]
            yield TRAIN[0][rows], TRAIN[1][rows]

    return gen


def _eval(fc):
    return accuracy_counts(fc, *VAL)


SHORT = LinearConfig(epochs=10, milestones=[6, 8])  # linear protocol (lr 5, momentum .9, wd 0), short


def test_protocol_defaults_and_step_decay():
    cfg = LinearConfig()
    protocol = (cfg.epochs, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.milestones)
    assert protocol == (100, 5.0, 0.9, 0.0, [60, 80])
    assert [cfg.lr_at(e) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([5, 5, 0.5, 0.5, 0.05, 0.05])
    fc = make_classifier(2048, 1000)
    assert fc.weight.std().item() == pytest.approx(0.01, rel=0.02) and not fc.bias.any()


def test_separable_features_reach_near_perfect_accuracy():
    torch.manual_seed(0)
    fc = make_classifier(DIM, CLASSES)
    assert _eval(fc)["top1"] < 60  # not solved before training
    result = train_linear(fc, _batches(), _eval, SHORT)
    assert result.last_top1 >= 99.0 and result.best_top1 >= result.last_top1
    assert len(result.history) == 10 and result.history[-1]["lr"] == pytest.approx(0.05)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_accuracy_counts_by_hand():
    fc = torch.nn.Linear(3, 3, bias=False)
    fc.weight.data = torch.eye(3)
    feats = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.9, 1.0, 0]])
    acc = accuracy_counts(fc, feats, torch.tensor([0, 1, 0, 0]))
    assert acc["top1"] == pytest.approx(50.0) and acc["top5"] == pytest.approx(100.0)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    whole = make_classifier(DIM, CLASSES)
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    expected = train_linear(whole, _batches(), _eval, SHORT, out_dir=tmp_path / "a")

    killed = make_classifier(DIM, CLASSES)
    killed.load_state_dict(start)
    with pytest.raises(KeyboardInterrupt):
        train_linear(killed, _batches(fail_at=4), _eval, SHORT, out_dir=tmp_path / "b")
    assert torch.load(tmp_path / "b" / STATE_FILE, weights_only=True)["epoch"] == 4
    resumed = make_classifier(DIM, CLASSES)  # a fresh process: new random init, overwritten by the state
    got = train_linear(resumed, _batches(), _eval, SHORT, out_dir=tmp_path / "b")
    torch.testing.assert_close(resumed.state_dict(), whole.state_dict(), rtol=0, atol=0)
    assert got.history == expected.history
    other = dataclasses.replace(SHORT, lr=1.0)
    with pytest.raises(ValueError, match="another protocol"):
        train_linear(make_classifier(DIM, CLASSES), _batches(), _eval, other, out_dir=tmp_path / "b")


def _two_rank_probe(init: dict) -> dict:
    from core import dist

    fc = make_classifier(DIM, CLASSES)
    fc.load_state_dict(init)
    part = dist.rank()
    val = [t.tensor_split(2)[part] for t in VAL]
    result = train_linear(fc, _batches(part, 2), lambda m: accuracy_counts(m, *val),
                          dataclasses.replace(SHORT, epochs=3))
    # numpy, not tensors: tensors cross the result queue as shared memory that dies with the rank
    return {"weights": {k: v.numpy() for k, v in fc.state_dict().items()}, "history": result.history}


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_equal_one_process(dist_run):
    torch.manual_seed(0)
    fc = make_classifier(DIM, CLASSES)
    init = {k: v.clone() for k, v in fc.state_dict().items()}
    expected = train_linear(fc, _batches(), _eval, dataclasses.replace(SHORT, epochs=3))
    for out in dist_run(_two_rank_probe, 2, init):
        got = {k: torch.from_numpy(v) for k, v in out["weights"].items()}
        torch.testing.assert_close(got, fc.state_dict(), rtol=1e-5, atol=1e-6)
        for a, b in zip(out["history"], expected.history, strict=True):
            assert a["top1"] == pytest.approx(b["top1"]) and a["top5"] == pytest.approx(b["top5"])

