"""The HCSC method (method.md §1, 3, 4, 5.1, 8).

- `encoders`: registry of torchvision ResNet trunks (`resnet50`, `resnet18`, `resnet18_small`).
- `heads`: the MoCo v2 projection head, in the trunk's `fc` slot (official key layout).
- `selection`: ICSC / PCSC keep probabilities, Bernoulli masks, the per-epoch selection cache.
- `losses`: logit builders (column layouts documented there) and InfoNCE.
- `momentum`: momentum update, shuffle-BN key forward, queue update.
- `hcsc`: `HCSC`, one training step's maths in `forward`.
- `checkpoint_io`: the official `module.encoder_q.*` checkpoint layout in and out.
"""
