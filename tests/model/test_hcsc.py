"""`HCSC.forward` end to end on a tiny model, each check against a naive recomputation (method.md §10)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from model import losses, selection
from model.momentum import momentum_update_
from tests.model._helpers import (
    SIZES,
    RecordingSampler,
    T,
    constant_sampler,
    make_batch,
    make_model,
    make_prototypes,
    moco_ce,
)

KEYS = ("loss", "loss_inst", "loss_proto", "loss_local_inst", "loss_local_proto", "acc_inst")


def _moco_reference(model, batch):
    """MoCo v2 recomputed by hand on a copy: query, momentum update, key, pre-enqueue queue."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        z = F.normalize(ref.encoder_q(batch.views[0]), dim=1)
        momentum_update_(ref.encoder_k, ref.encoder_q, 0.999)
        k = F.normalize(ref.encoder_k(batch.views[1]), dim=1)
    return moco_ce(z, k, ref.queue)


@pytest.mark.parametrize("prototypes_given", [False, True])
def test_warmup_or_no_prototypes_is_moco(prototypes_given):
    model, batch = make_model(), make_batch()
    want = _moco_reference(model, batch)
    protos = make_prototypes() if prototypes_given else None
    out = model(batch, protos, epoch=0)  # epoch 0 < warmup 1
    assert set(out) == set(KEYS)
    assert abs(float(out["loss"].detach()) - float(want)) < 1e-5
    for key in ("loss_proto", "loss_local_inst", "loss_local_proto"):
        assert float(out[key]) == 0.0


@pytest.mark.parametrize("average", [False, True])
def test_all_instance_masks_kept_gives_levels_times_moco(average):
    model = make_model(average_instance_loss=average)
    model.mask_sampler = constant_sampler(True)
    batch = make_batch()
    want = _moco_reference(model, batch)
    out = model(batch, make_prototypes(), epoch=1)
    factor = 1 if average else len(SIZES)  # method.md §3: summed over levels (x3) unless averaged
    assert abs(float(out["loss_inst"].detach()) - factor * float(want)) < 1e-5
    for logits in model.last_terms.inst_logits:
        assert torch.equal(logits, model.last_terms.inst_logits[0])


def test_all_instance_masks_dropped_gives_the_closed_form():
    model = make_model(queue=64)
    model.mask_sampler = constant_sampler(False)
    out = model(make_batch(), make_prototypes(), epoch=1)
    terms = model.last_terms
    s_pos = (terms.q * terms.k).sum(1).double() / T
    closed = (-s_pos + torch.log(torch.exp(s_pos) + 64)).mean()
    for logits in terms.inst_logits:
        assert torch.all(logits[:, 1:] == 0.0)
        assert abs(float(losses.info_nce(logits.detach())) - float(closed)) < 1e-6
    assert abs(float(out["loss_inst"].detach()) - 3 * float(closed)) < 1e-5


def test_masks_use_the_right_probabilities_after_several_steps():
    """Keep probabilities seen inside the step equal brute force on the pre-enqueue queue."""
    model, protos = make_model(queue=32), make_prototypes()
    sampler = RecordingSampler()
    model.mask_sampler = sampler
    for step in range(3):  # the queue wraps; the cached denominators are updated incrementally
        sampler.probs.clear()
        sampler.masks.clear()
        batch = make_batch(seed=step)
        queue_before = model.queue.clone()
        model(batch, protos, epoch=1)
        terms = model.last_terms
        assert torch.equal(terms.queue, queue_before)  # method.md §10.9: selection uses the pre-enqueue queue
        inst = [p for p in sampler.probs if p.shape == (3, 8, 32)]  # all levels in one draw
        proto = [p for p in sampler.probs if p.shape[-1] != 32]
        assert len(inst) == 1 and len(proto) == 2  # no mask at the top level
        drawn = sampler.masks[next(i for i, p in enumerate(sampler.probs) if p is inst[0])]
        for lvl in range(3):
            y = protos.im2cluster[lvl][batch.idx]
            assert torch.equal(terms.labels[lvl], y)
            scores = queue_before.t() @ protos.centroids[lvl].t() / protos.density[lvl].clamp_min(1e-3)
            want = (1 - torch.softmax(scores.double(), 1)[:, y].t()).clamp(0, 0.999)
            torch.testing.assert_close(inst[0][lvl].double(), want, atol=1e-5, rtol=0)
            assert torch.equal(terms.inst_masks[lvl], drawn[lvl])  # the mask used is the one drawn
        for lvl in range(2):
            u = protos.cluster2cluster[lvl][protos.im2cluster[lvl][batch.idx]]
            a = protos.logits[lvl] / protos.density[lvl + 1]
            want = (1 - torch.softmax(a.double(), 1)[:, u].t()).clamp(1e-4, 0.999)
            torch.testing.assert_close(proto[lvl].double(), want, atol=1e-6, rtol=0)
        assert terms.proto_masks[-1] is None  # method.md §10.3: the top level is never selected


def test_instance_logits_apply_the_sampled_masks():
    model = make_model()
    model.mask_sampler = RecordingSampler(seed=3)
    model(make_batch(), make_prototypes(), epoch=1)
    t = model.last_terms
    l_pos, l_neg = (t.q * t.k).sum(1, keepdim=True), t.q @ t.queue
    for lvl in range(3):
        assert t.inst_masks[lvl].dtype == torch.bool and t.inst_masks[lvl].shape == (8, 64)
        for i in range(8):
            row = torch.cat([l_pos[i], torch.where(t.inst_masks[lvl][i], l_neg[i], 0.0)]) / T
            torch.testing.assert_close(t.inst_logits[lvl][i].detach(), row, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fix_last", [False, True])
def test_prototype_negatives_and_columns(fix_last):
    model, protos, batch = make_model(fix_last_prototype=fix_last), make_prototypes(), make_batch()
    y1, y2 = protos.im2cluster[0], protos.im2cluster[1]
    batch.idx = torch.nonzero((y1 != y1.max()) & (y2 != y2.max()))[:8, 0]  # the last ids stay candidates
    assert batch.idx.shape == (8,)
    model.mask_sampler = RecordingSampler(seed=1)
    model(batch, protos, epoch=1)
    t = model.last_terms
    for lvl in range(3):
        y = protos.im2cluster[lvl][batch.idx]
        top = int(protos.im2cluster[lvl].max())  # over the dataset, as the official range(max)
        negs = sorted(set(range(top + 1 if fix_last else top)) - set(y.tolist()))
        assert torch.arange(SIZES[lvl])[~t.proto_excluded[lvl]].tolist() == negs
        keep = t.proto_masks[lvl]
        c, phi = protos.centroids[lvl], protos.density[lvl]
        compact = losses.compact_proto_logits(t.proto_logits[lvl].detach(), t.proto_excluded[lvl])
        assert compact.shape == (8, 1 + len(negs))
        for i in range(8):
            row = [float(t.q[i] @ c[y[i]]) / float(phi[y[i]])]
            row += [(1.0 if keep is None or keep[i, j] else 0.0) * float(t.q[i] @ c[j]) / float(phi[j])
                    for j in negs]
            torch.testing.assert_close(compact[i], torch.tensor(row), atol=1e-5, rtol=0)


def test_loss_aggregation_recomputed_from_logits_single_crop():
    model = make_model()
    out = model(make_batch(), make_prototypes(), epoch=1)
    t, ce = model.last_terms, (lambda x: float(losses.info_nce(x.detach())))
    assert len(t.inst_logits) == 3 and all(x.shape == (8, 65) for x in t.inst_logits)
    inst = sum(ce(x) for x in t.inst_logits)
    proto = sum(ce(x) for x in t.proto_logits) / 3
    assert abs(float(out["loss_inst"].detach()) - inst) < 1e-5
    assert abs(float(out["loss_proto"].detach()) - proto) < 1e-5
    assert abs(float(out["loss"].detach()) - inst - proto) < 1e-5
    acc = float((t.inst_logits[0].argmax(1) == 0).float().mean()) * 100
    assert float(out["acc_inst"]) == pytest.approx(acc)


@pytest.mark.parametrize("on_local", [True, False])
def test_multi_crop_local_terms(on_local):
    model = make_model(multi_crop=True, selection_on_local=on_local)
    model.mask_sampler = RecordingSampler(seed=2)
    out = model(make_batch(local=4), make_prototypes(), epoch=1)
    t, ce = model.last_terms, (lambda x: float(losses.info_nce(x.detach())))
    assert len(t.local_q) == 4
    assert len(t.local_inst_logits) == (12 if on_local else 4)  # method.md §10.4: L x V with selection
    for v, z in enumerate(t.local_q):
        l_pos, l_neg = (z * t.k).sum(1, keepdim=True), z @ t.queue
        masks = t.inst_masks if on_local else [None]
        for lvl, m in enumerate(masks):  # the SAME masks as the global query (method.md §5.1)
            want = losses.instance_logits(l_pos, l_neg, m, T)
            torch.testing.assert_close(t.local_inst_logits[v * len(masks) + lvl].detach(), want)
    assert abs(float(out["loss_local_inst"].detach()) - sum(ce(x) for x in t.local_inst_logits)) < 1e-4
    assert len(t.local_proto_logits) == 4 and all(len(v) == 3 for v in t.local_proto_logits)
    local_proto = sum(ce(x) for v in t.local_proto_logits for x in v) / 3  # / L, not / (V L)
    assert abs(float(out["loss_local_proto"].detach()) - local_proto) < 1e-5
    for v in range(4):  # fresh prototype masks for every view
        assert not torch.equal(t.local_proto_masks[v][0], t.proto_masks[0])
        assert t.local_proto_masks[v][2] is None
    total = sum(float(out[k].detach()) for k in KEYS[1:5])
    assert abs(float(out["loss"].detach()) - total) < 1e-4


def test_multi_crop_warmup_has_plain_local_terms():
    model = make_model(multi_crop=True)
    out = model(make_batch(local=4), None, epoch=5)
    t = model.last_terms
    want = sum(float(moco_ce(z, t.k, t.queue)) for z in t.local_q)
    assert abs(float(out["loss_local_inst"].detach()) - want) < 1e-5
    assert float(out["loss_local_proto"]) == 0.0


def test_selection_switches_off():
    model = make_model(instance_selection=False, proto_selection=False)
    model.mask_sampler = RecordingSampler()
    out = model(make_batch(), make_prototypes(), epoch=1)
    t = model.last_terms
    assert model.mask_sampler.probs == []
    assert len(t.inst_logits) == 1 and abs(float(out["loss_inst"].detach()) - float(
        moco_ce(t.q, t.k, t.queue))) < 1e-5
    assert all(m is None for m in t.proto_masks) and float(out["loss_proto"].detach()) > 0


def test_queue_pointer_contents_and_indices_after_steps():
    model, protos = make_model(queue=16), make_prototypes()
    stored_keys, stored_idx = [], []
    for step in range(3):
        batch = make_batch(seed=step)
        model(batch, protos if step else None, epoch=1)
        stored_keys.append(model.last_terms.k)
        stored_idx.append(batch.idx)
        assert int(model.queue_ptr) == (8 * (step + 1)) % 16
    # step 2 wrapped onto columns 0..7; step 1 is at 8..15
    torch.testing.assert_close(model.queue[:, :8], stored_keys[2].t())
    torch.testing.assert_close(model.queue[:, 8:], stored_keys[1].t())
    assert torch.equal(model.queue_index, torch.cat([stored_idx[2], stored_idx[1]]))
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(16))


def _perturb(encoder):
    with torch.no_grad():  # make the two encoders differ (at init encoder_k is an exact copy)
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_momentum_update_value_and_bn_buffers_not_copied():
    model, batch = make_model(), make_batch()
    _perturb(model.encoder_q)
    k_old = {n: p.clone() for n, p in model.encoder_k.named_parameters()}
    q_old = {n: p.clone() for n, p in model.encoder_q.named_parameters()}
    ref_k = copy.deepcopy(model.encoder_k)
    momentum_update_(ref_k, model.encoder_q, 0.999)
    ref_k(batch.views[1])  # its own train-mode forward: the only thing that moves its BN buffers
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
    model(batch, None, epoch=0)["loss"].backward()
    for n, p in model.encoder_k.named_parameters():
        torch.testing.assert_close(p, 0.999 * k_old[n] + 0.001 * q_old[n], atol=1e-7, rtol=1e-6)
    for n, buf in model.encoder_k.named_buffers():
        torch.testing.assert_close(buf, dict(ref_k.named_buffers())[n], msg=n)
    assert not torch.equal(model.encoder_k.bn1.running_mean, model.encoder_q.bn1.running_mean)
    opt.step()  # the new theta_q is used by the next step's update
    k_first = {n: p.clone() for n, p in model.encoder_k.named_parameters()}
    q_new = {n: p.clone() for n, p in model.encoder_q.named_parameters()}
    model(batch, None, epoch=0)
    for n, p in model.encoder_k.named_parameters():
        torch.testing.assert_close(p, 0.999 * k_first[n] + 0.001 * q_new[n], atol=1e-7, rtol=1e-6)


def test_momentum_update_runs_before_the_key_forward():
    model, batch = make_model(), make_batch()
    model.model_cfg.momentum = 0.5  # a large step so that the order is visible in the keys
    _perturb(model.encoder_q)
    before, after = copy.deepcopy(model.encoder_k), copy.deepcopy(model.encoder_k)
    momentum_update_(after, model.encoder_q, 0.5)
    with torch.no_grad():
        k_before = F.normalize(before(batch.views[1]), dim=1)
        k_after = F.normalize(after(batch.views[1]), dim=1)
    model(batch, None, epoch=0)
    assert (k_before - k_after).abs().max() > 1e-3
    torch.testing.assert_close(model.last_terms.k, k_after)


def test_gradients_reach_only_the_query_encoder_and_head():
    model = make_model(multi_crop=True, selection_on_local=True)
    out = model(make_batch(local=4), make_prototypes(), epoch=1)
    assert all(p.grad is None for p in model.parameters())  # forward alone does no backward
    out["loss"].backward()
    for name, p in model.encoder_q.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder_q.fc[0].weight.grad.abs().sum() > 0
    assert model.encoder_q.conv1.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in model.encoder_k.parameters())
    assert not model.queue.requires_grad


def test_embed_momentum_and_backbone_features():
    model = make_model().eval()
    x = make_batch().views[0]
    emb = model.embed_momentum(x)
    torch.testing.assert_close(emb, F.normalize(model.encoder_k(x), dim=1))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(8))
    feats = model.backbone_features(x)
    assert feats.shape == (8, 512) and not feats.requires_grad
    with pytest.raises(ValueError, match="which"):
        model.backbone_features(x, which="z")


def test_bad_inputs_fail_with_a_named_key():
    model = make_model()
    with pytest.raises(ValueError, match="batch.views"):
        model(make_batch(local=4), None, epoch=0)
    two_levels = make_prototypes(sizes=(12, 6))
    with pytest.raises(ValueError, match="hcsc.num_clusters"):
        model(make_batch(), two_levels, epoch=1)
    with pytest.raises(ValueError, match="model.queue_size"):
        make_model(queue=20)(make_batch(), None, epoch=0)


@pytest.mark.gpu
def test_step_has_no_host_sync_on_cuda():
    """A training step (forward, backward) on CUDA with sync debug mode 'error': any
    .item()/.cpu()/nonzero raises."""
    model = make_model(queue=64, multi_crop=True, selection_on_local=True).cuda()
    model.step_observer = None
    protos = make_prototypes().to("cuda")
    batch = make_batch(local=4).to("cuda")
    model.mask_sampler = selection.sample_mask
    model(batch, protos, epoch=1)["loss"].backward()  # warm the cache (its refresh may allocate)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            model(batch, protos, epoch=1)["loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(("multi_crop", "selection"), [(False, True), (True, True), (False, False)])
def test_per_level_metrics_add_up_and_match_the_masks(multi_crop, selection):
    model = make_model(multi_crop=multi_crop, instance_selection=selection, proto_selection=selection)
    protos = make_prototypes()
    batch = make_batch(local=4 if multi_crop else 0)
    out = {k: v.detach() for k, v in model(batch, protos, epoch=1, metrics=True).items()}
    t = model.last_terms
    levels = range(1, len(SIZES) + 1)
    inst_levels = levels if selection else [1]  # without ICSC there is one unmasked instance loss
    per_level = sum(float(out[f"loss_inst/l{lvl}"]) for lvl in inst_levels)
    assert per_level == pytest.approx(float(out["loss_inst"]))
    assert sum(float(out[f"loss_proto/l{lvl}"]) for lvl in levels) / len(SIZES) == pytest.approx(
        float(out["loss_proto"]))
    for lvl in levels:
        kept_inst, kept_proto = float(out[f"kept_inst/l{lvl}"]), float(out[f"kept_proto/l{lvl}"])
        assert 0 <= kept_inst <= 1 and 0 <= kept_proto <= 1
        assert 0 <= float(out[f"acc_proto/l{lvl}"]) <= 100
        if not selection or lvl == len(SIZES):  # nothing is selected: everything is kept
            assert kept_proto == 1.0
        if not selection:
            assert kept_inst == 1.0
        else:
            assert kept_inst == pytest.approx(float(t.inst_masks[lvl - 1].float().mean()))
    if selection:
        keep, cand = t.proto_masks[0], ~t.proto_excluded[0]
        want = keep[:, cand].float().mean()
        assert float(out["kept_proto/l1"]) == pytest.approx(float(want))
    local = [k for k in out if k.startswith("loss_local")]
    if multi_crop:
        # local views reuse no instance masks here (hcsc.selection_on_local off): one level
        assert float(out["loss_local_inst/l1"]) == pytest.approx(float(out["loss_local_inst"]))
        assert sum(float(out[f"loss_local_proto/l{lvl}"]) for lvl in levels) / len(SIZES) == pytest.approx(
            float(out["loss_local_proto"]))
    else:
        assert local == ["loss_local_inst", "loss_local_proto"]  # no per-level local terms


def test_metrics_are_only_computed_when_asked_and_change_no_loss():
    protos, batch = make_prototypes(), make_batch()
    plain = make_model(seed=3)(batch, protos, epoch=1)
    with_metrics = make_model(seed=3)(batch, protos, epoch=1, metrics=True)
    assert not any("/l" in k for k in plain)
    assert all(torch.equal(plain[k], with_metrics[k]) for k in plain)
    warmup = make_model()(batch, protos, epoch=0, metrics=True)  # plain MoCo: no levels yet
    assert not any("/l" in k for k in warmup)
