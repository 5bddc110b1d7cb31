"""Logit builders and InfoNCE against naive loops and closed forms (method.md §3, 4, 10.1, 10.2, 10.7)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model import losses
from tests.model._helpers import T


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_instance_logits_match_loop_with_a_random_mask():
    z, k, queue = _unit(5, 8), _unit(5, 8, seed=1), _unit(30, 8, seed=2).t()
    keep = torch.rand(5, 30, generator=torch.Generator().manual_seed(3)) < 0.5
    got = losses.instance_logits((z * k).sum(1, keepdim=True), z @ queue, keep, T)
    for i in range(5):
        row = [float(z[i] @ k[i]) / T]
        row += [float(keep[i, j]) * float(z[i] @ queue[:, j]) / T for j in range(30)]
        torch.testing.assert_close(got[i], torch.tensor(row), atol=1e-6, rtol=0)
    dropped = got[:, 1:][~keep]
    assert torch.all(dropped == 0.0)  # method.md §10.2: masked entries are exactly 0.0


def test_all_kept_is_moco_and_all_dropped_is_the_closed_form():
    z, k, queue = _unit(6, 8), _unit(6, 8, seed=1), _unit(50, 8, seed=2).t()
    l_pos, l_neg = (z * k).sum(1, keepdim=True), z @ queue
    moco = losses.info_nce(torch.cat([l_pos, l_neg], 1) / T)
    ones = torch.ones(6, 50, dtype=torch.bool)
    assert torch.equal(losses.info_nce(losses.instance_logits(l_pos, l_neg, ones, T)), moco)
    zeros = torch.zeros(6, 50, dtype=torch.bool)
    got = losses.info_nce(losses.instance_logits(l_pos, l_neg, zeros, T))
    s = l_pos[:, 0].double() / T
    closed = (-s + torch.log(torch.exp(s) + 50)).mean()  # method.md §10.2 with K = 50
    assert abs(float(got) - float(closed)) < 1e-6
    removed = losses.info_nce(losses.instance_logits(l_pos, l_neg, zeros, T, remove_dropped=True))
    assert float(removed) == 0.0  # -inf negatives: only the positive remains


def test_stacked_levels_equal_level_by_level():
    z, k, queue = _unit(6, 8), _unit(6, 8, seed=1), _unit(40, 8, seed=2).t()
    l_pos, l_neg = (z * k).sum(1, keepdim=True), z @ queue
    keep = torch.rand(3, 6, 40, generator=torch.Generator().manual_seed(4)) < 0.5
    stacked = losses.instance_logits(l_pos, l_neg, keep, T)
    assert stacked.shape == (3, 6, 41)
    per_level = losses.info_nce_levels(stacked)
    for lvl in range(3):
        one = losses.instance_logits(l_pos, l_neg, keep[lvl], T)
        assert torch.equal(stacked[lvl], one)
        assert abs(float(per_level[lvl]) - float(losses.info_nce(one))) < 1e-6


def test_info_nce_closed_form_identical_embeddings():
    z = _unit(4, 8)
    logits = torch.cat([(z * z).sum(1, keepdim=True), (z * z).sum(1, keepdim=True).expand(4, 9)], 1)
    assert abs(float(losses.info_nce(logits)) - math.log(10)) < 1e-6  # K equal negatives: log(K+1)


def _excluded_reference(batch_labels, max_label, fix_last):
    """The official set construction: N = set(range(max)) - set(batch labels)."""
    top = max_label + 1 if fix_last else max_label
    return sorted(set(range(top)) - set(batch_labels.tolist()))


def test_excluded_prototypes_equals_the_set_construction():
    labels = torch.tensor([3, 7, 3, 0, 9])
    for max_label, fix in [(11, False), (11, True), (8, False), (8, True)]:
        excl = losses.excluded_prototypes(labels, 12, torch.tensor(max_label), fix)
        kept = torch.arange(12)[~excl].tolist()
        assert kept == _excluded_reference(labels, max_label, fix)
        assert excl[labels].all()  # every positive of the batch is excluded (method.md §10.7)
        assert bool(excl[max_label]) is (not fix)  # the inherited off-by-one, and its fix


def _proto_loop(z, cents, dens, labels, negs, keep):
    """The method's layout [z.c_y/phi_y, {t_ij (z.c_j)/phi_j}_{j in N}], one row at a time."""
    rows = []
    for i in range(z.shape[0]):
        y = int(labels[i])
        row = [float(z[i] @ cents[y]) / float(dens[y])]
        row += [float(keep[i, j]) * float(z[i] @ cents[j]) / float(dens[j]) for j in negs]
        rows.append(row)
    return torch.tensor(rows)


def test_proto_logits_layout_equals_the_spec_layout_with_the_same_ce_and_gradient():
    z = _unit(5, 8).requires_grad_(True)
    cents, labels = _unit(12, 8, seed=1), torch.tensor([3, 7, 3, 0, 9])
    dens = torch.rand(12, generator=torch.Generator().manual_seed(2)) * 0.3 + 0.05
    keep = torch.rand(5, 12, generator=torch.Generator().manual_seed(3)) < 0.6
    excl = losses.excluded_prototypes(labels, 12, torch.tensor(11))
    negs = _excluded_reference(labels, 11, False)
    full = losses.proto_logits(z, cents, dens, labels, excl, keep)
    assert full.shape == (5, 13)
    assert torch.isneginf(full[:, 1:][:, excl]).all()
    compact = losses.compact_proto_logits(full, excl)
    want = _proto_loop(z.detach(), cents, dens, labels, negs, keep)
    assert compact.shape == (5, 1 + len(negs))
    torch.testing.assert_close(compact.detach(), want, atol=1e-6, rtol=0)
    # column 0: the query's own positive over its own concentration (method.md §10.7)
    torch.testing.assert_close(full[:, 0].detach(), (z * cents[labels]).sum(1).detach() / dens[labels])
    # dropped candidates are exactly 0, not removed
    dropped = (~keep) & (~excl)[None, :]
    assert torch.all(full[:, 1:][dropped] == 0.0)
    # the -inf columns contribute nothing: same CE and the same gradient as the method's layout
    ce_full = losses.info_nce(full)
    z2 = z.detach().clone().requires_grad_(True)
    ref = losses.compact_proto_logits(losses.proto_logits(z2, cents, dens, labels, excl, keep), excl)
    ce_ref = F.cross_entropy(ref, torch.zeros(5, dtype=torch.long))
    want_ce = (torch.logsumexp(want.double(), 1) - want[:, 0].double()).mean()
    assert abs(float(ce_full.detach()) - float(want_ce)) < 1e-6
    assert abs(float(ce_full.detach()) - float(ce_ref.detach())) < 1e-6
    ce_full.backward()
    ce_ref.backward()
    torch.testing.assert_close(z.grad, z2.grad, atol=1e-6, rtol=0)


def test_proto_logits_without_mask_and_with_removal():
    z, cents, labels = _unit(3, 8), _unit(6, 8, seed=1), torch.tensor([1, 1, 4])
    dens = torch.full((6,), T)
    excl = losses.excluded_prototypes(labels, 6, torch.tensor(5), fix_last=True)
    plain = losses.proto_logits(z, cents, dens, labels, excl, None)
    kept = torch.ones(3, 6, dtype=torch.bool)
    assert torch.equal(plain, losses.proto_logits(z, cents, dens, labels, excl, kept))
    none_kept = torch.zeros(3, 6, dtype=torch.bool)
    removed = losses.proto_logits(z, cents, dens, labels, excl, none_kept, remove_dropped=True)
    assert torch.isneginf(removed[:, 1:]).all() and float(losses.info_nce(removed)) == 0.0


def test_top1_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0], [5.0, -1.0]])
    assert float(losses.top1_accuracy(logits)) == 75.0  # a tie goes to column 0, as argmax does
