"""The literal scorer: docs/model.md §3–§6 word for word, one (image, caption) pair at a time.

Kept as the reference the fast scorer of :mod:`shan.model` is tested and benchmarked against.
It drops padding first, projects V and T for the pair, concatenates ``[v_i ; t*_i]`` and applies
the gate's full ``2d -> d`` layer, exactly as the formulas are written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from shan.model import SCORES, SHAN, EncodedCaptions, EncodedImages


def cos(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a, b, dim=-1, eps=1e-8)


def score_pair(model: SHAN, v: Tensor, t: Tensor) -> dict[str, Tensor]:
    """One pair: v (k, d) real regions, t (n, d) real words -> scalar l2l, g2l, g2g, total."""
    c = model.cfg
    # Step 1, L2L: A = (W~v V)(W~t T)^T, (k, n)
    pv, pt = v @ model.proj_v.weight.T, t @ model.proj_t.weight.T
    if c.affinity == "cosine":
        pv, pt = F.normalize(pv, dim=-1, eps=1e-8), F.normalize(pt, dim=-1, eps=1e-8)
    a = pv @ pt.T  # (k, n)
    alpha = torch.softmax(c.lambda_l2l * a, dim=1)  # over words j
    beta = torch.softmax(c.lambda_l2l * a, dim=0)  # over regions i
    t_star = alpha @ t  # (k, d): t*_i = sum_j alpha_ij t_j
    v_star = beta.T @ v  # (n, d): v*_j = sum_i beta_ij v_i
    r_v = cos(v, t_star)  # (k,)
    r_t = cos(t, v_star)  # (n,)
    mu_v, mu_t = model._direction_weights(c.mu)
    s_l2l = mu_v * r_v.mean() + mu_t * r_t.mean()

    # Step 2, G2L: gated fusion, self-attention pooling, global-to-local attention.
    g = torch.sigmoid(model.gate_v(torch.cat([v, t_star], dim=1)))  # (k, d)
    vc = g * v + (1 - g) * t_star
    h = torch.sigmoid(model.gate_t(torch.cat([t, v_star], dim=1)))  # (n, d)
    tc = h * t + (1 - h) * v_star
    a_v = torch.softmax(model.pool_v.w(torch.tanh(model.pool_v.proj(vc))).squeeze(1), dim=0)
    a_t = torch.softmax(model.pool_t.w(torch.tanh(model.pool_t.proj(tc))).squeeze(1), dim=0)
    v_c = a_v @ vc  # (d,)
    t_c = a_t @ tc  # (d,)
    t_star_c = torch.softmax(c.lambda_g2l * cos(v_c[None], t), dim=0) @ t  # (d,)
    v_star_c = torch.softmax(c.lambda_g2l * cos(t_c[None], v), dim=0) @ v  # (d,)
    g_v, g_t = model._direction_weights(0.5)
    s_g2l = g_v * cos(v_c, t_star_c) + g_t * cos(t_c, v_star_c)

    # Step 3, G2G.
    s_g2g = cos(v_c + t_star_c, t_c + v_star_c)
    total = c.w_l2l * s_l2l + c.w_g2l * s_g2l + c.w_g2g * s_g2g
    return {"total": total, "l2l": s_l2l, "g2l": s_g2l, "g2g": s_g2g}


def score_literal(model: SHAN, images: EncodedImages, captions: EncodedCaptions) -> dict:
    """Every pair, one at a time: {"total", "l2l", "g2l", "g2g"}, each (Ni, Nc)."""
    ni, nc = len(images), len(captions)
    out = {k: torch.empty(ni, nc, device=images.v.device) for k in SCORES}
    for i in range(ni):
        v = images.v[i][images.mask[i]]  # (k_i, d)
        for j in range(nc):
            t = captions.t[j][captions.mask[j]]  # (n_j, d)
            for key, val in score_pair(model, v, t).items():
                out[key][i, j] = val
    return out
