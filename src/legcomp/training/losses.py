"""Partial-label segmentation loss: a structure a sample does not label is never learnt as background.

Marginal loss (Fang & Yan 2020, "Multi-organ segmentation over partially labeled datasets with
multi-scale feature abstraction"; Shi et al. 2021, "Marginal loss and exclusion loss for partially
supervised multi-organ segmentation"). With softmax probabilities ``p`` (B, C, x, y, z) and
``classes`` (B, C) (1 = the sample labels that class, 0 = it does not; background always counts as
labelled), each sample's probabilities are merged:

* ``p'_0 = p_0 + sum_{c unlabelled} p_c`` (the unlabelled classes' mass joins background, which in
  such a sample means "background or an unlabelled structure");
* ``p'_c = p_c`` for labelled classes, ``p'_c = 0`` for unlabelled ones.

Voxels whose target is :data:`legcomp.anatomy.IGNORE` (or a class the sample does not label) are
left out of both terms. Voxels whose target is :data:`legcomp.anatomy.UNNAMED_MUSCLE` ("one of the
muscles this sample does not label") enter the second term only, with ``p'_t = sum_{c unlabelled} p_c``
(left out where the sample labels every class). Then, ``t`` being the target class and ``V`` the kept voxels of the batch:

* ``dicece``: ``DiceLoss(p' * m, onehot(t) * m) + CE``, ``CE = -1/|V| sum_V log p'_t``;
* ``dicefocal``: ``DiceLoss(p' * m, onehot(t) * m) + FL``, ``FL = -1/|V| sum_V (1 - p'_t)^gamma log p'_t``
  (softmax focal loss on ``p'``, gamma 2; MONAI's ``DiceFocalLoss`` uses a channel-wise sigmoid
  focal term on the logits instead, which cannot be marginalised);

where ``m`` is the kept-voxel mask and ``DiceLoss`` is MONAI's (``include_background=True``,
``batch=True``: per class over the batch and space, then the mean over classes; smooth 1e-5).
``log p'`` is computed in log space (log-softmax and log-sum-exp of the merged logits), so it is
finite wherever ``p'`` is not exactly zero. With every class labelled and no ignored voxel,
``dicece`` equals MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True, batch=True)``.
"""

from __future__ import annotations

import torch

from legcomp import anatomy

KINDS = ("dicece", "dicefocal")


class PartialLabelLoss(torch.nn.Module):
    """Marginal Dice + cross-entropy (or focal) loss for partially labelled data (see module doc).

    Args:
        kind: ``dicece`` or ``dicefocal``.
        gamma: focal exponent (``dicefocal`` only).
        ignore_index: target value left out of the loss (:data:`legcomp.anatomy.IGNORE`).
    """

    def __init__(self, kind: str = "dicece", gamma: float = 2.0, ignore_index: int = anatomy.IGNORE,
                 smooth: float = 1e-5, unnamed_index: int = anatomy.UNNAMED_MUSCLE):
        super().__init__()
        from monai.losses import DiceLoss

        if kind not in KINDS:
            raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(KINDS)}")
        self.kind = kind
        self.gamma = float(gamma)
        self.ignore_index = int(ignore_index)
        self.unnamed_index = int(unnamed_index)
        self.dice = DiceLoss(include_background=True, to_onehot_y=False, softmax=False, batch=True,
                             smooth_nr=smooth, smooth_dr=smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss.

        Args:
            logits: float (B, C, x, y, z) network output (before softmax).
            target: integer (B, 1, x, y, z) class ids, ``ignore_index`` where unlabelled,
                ``unnamed_index`` where one of the sample's unlabelled classes.
            classes: float/bool (B, C), 1 for the classes each sample labels; None = all labelled.
        """
        logits = logits.float()
        b, n = logits.shape[:2]
        if classes is None:
            lab = torch.ones(b, n, dtype=torch.bool, device=logits.device)
        else:
            lab = torch.as_tensor(classes, device=logits.device).reshape(b, n) > 0.5
        lab = lab.clone()
        lab[:, 0] = True
        view = (b, n) + (1,) * (logits.ndim - 2)
        lab_v = lab.view(view)
        merge_v = (~lab).view(view)
        merge_v[:, :1] = True  # background plus the unlabelled classes
        lse = torch.logsumexp(logits, dim=1, keepdim=True)
        neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
        log_bg = torch.logsumexp(torch.where(merge_v, logits, neg_inf), dim=1, keepdim=True) - lse
        logp = torch.cat([log_bg, torch.where(lab_v[:, 1:], logits[:, 1:] - lse, neg_inf)], dim=1)  # log p'

        t = target.long()
        if t.ndim == logits.ndim - 1:
            t = t[:, None]
        # "one of the unlabelled muscles": scored on the summed mass of the sample's unlabelled classes
        unl_v = (~lab_v).clone()
        unl_v[:, :1] = False
        unnamed = (t == self.unnamed_index) & unl_v.any(dim=1, keepdim=True)
        keep = (t != self.ignore_index) & (t != self.unnamed_index)
        t0 = torch.where(keep, t, torch.zeros_like(t))
        keep = keep & torch.gather(lab_v.expand(-1, -1, *t.shape[2:]), 1, t0)  # a target the sample does not label
        t0 = torch.where(keep, t0, torch.zeros_like(t0))
        m = keep.to(logits.dtype)
        scored = keep | unnamed
        n_keep = scored.to(logits.dtype).sum().clamp(min=1.0)

        logp_t = torch.gather(logp, 1, t0)
        if bool(unnamed.any()):
            # a sample without unlabelled classes sums over background instead (never used; keeps the
            # log-sum-exp of all -inf, whose gradient is NaN, out of the graph)
            sel = torch.where(unl_v.any(dim=1, keepdim=True), unl_v, merge_v)
            log_unl = torch.logsumexp(torch.where(sel, logits, neg_inf), dim=1, keepdim=True) - lse
            logp_t = torch.where(unnamed, log_unl, logp_t)
        logp_t = torch.where(scored, logp_t, torch.zeros_like(logp_t))  # also keeps -inf out of the sums
        if self.kind == "dicece":
            second = -logp_t.sum() / n_keep
        else:
            pt = logp_t.exp()
            second = -((1.0 - pt).clamp(min=0.0).pow(self.gamma) * logp_t).sum() / n_keep
        onehot = torch.zeros_like(logits).scatter_(1, t0, 1.0) * m
        dice = self.dice(logp.exp() * m, onehot)
        return dice + second


def all_classes(batch: int, n_classes: int, device=None) -> torch.Tensor:
    """(batch, n_classes) ones: every class labelled."""
    return torch.ones(batch, n_classes, dtype=torch.float32, device=device)
