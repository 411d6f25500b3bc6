"""SHAN: Step-wise Hierarchical Alignment Network (Ji, Chen, Wang; IJCAI 2021).

One file: the encoders (docs/model.md §2), the three alignment steps L2L, G2L and G2G (§3-§5),
the weighted total (§6), and the exact fast scorer of §8, which scores a block of images
against a block of captions at once. Shapes use

    Ni images, k regions, Nc captions, n words, d joint size, d_a pooling width, F features.

The literal pair-by-pair transcription of the formulas lives in :mod:`shan.reference`; tests
hold the two equal.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from shan.config import FIRST_STAGE_POOLS, ModelConfig
from shan.metrics import SCORES, STEPS  # noqa: F401 (the model's score names, re-exported)

if TYPE_CHECKING:
    from shan.vocab import Vocabulary

EPS = 1e-8
FIRST_STAGE_SEED = 1729  # the first stage's initial weights (drawn apart from SHAN's)


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    """Unit vectors along ``dim`` (a zero vector stays zero)."""
    return x / (x.norm(dim=dim, keepdim=True) + EPS)


def masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` with entries where ``mask`` is False excluded (weight 0).

    ``mask`` broadcasts against ``logits``; every slice along ``dim`` must keep one entry.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax in at least float32
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of ``x`` over the entries of ``dim`` where ``mask`` is True."""
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


_E = TypeVar("_E", bound="_Encoded")


class _Encoded:
    """Rows of encoded images or captions: every field is indexed along its first axis."""

    def __len__(self) -> int:
        return int(getattr(self, dataclasses.fields(self)[0].name).shape[0])  # type: ignore[arg-type]

    def __getitem__(self: _E, idx: slice | Tensor) -> _E:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return type(self)(*(getattr(self, f.name)[idx] for f in fields))


@dataclass
class EncodedImages(_Encoded):
    """Encoded regions and what the fast scorer precomputes once per image.

    v:    (Ni, k, d) region embeddings, unit length
    mask: (Ni, k)    True for real regions
    vp:   (Ni, k, d) L2L projection W~v v (unit length when ``affinity`` is cosine)
    vg:   (Ni, k, 2d) [v ; U2 v]: values the text side attends to, and their gate term
    pv:   (Ni, k, d) image gate term P v + b_g
    """

    v: Tensor
    mask: Tensor
    vp: Tensor
    vg: Tensor
    pv: Tensor


@dataclass
class EncodedCaptions(_Encoded):
    """Encoded words and what the fast scorer precomputes once per caption.

    t:    (Nc, n, d)  word embeddings, unit length
    mask: (Nc, n)     True for real words
    tp:   (Nc, n, d)  L2L projection W~t t
    tq:   (Nc, n, 2d) [t ; Q t]: values the image side attends to, and their gate term
    u1t:  (Nc, n, d)  text gate term U1 t + c_g
    """

    t: Tensor
    mask: Tensor
    tp: Tensor
    tq: Tensor
    u1t: Tensor

    def trimmed(self) -> EncodedCaptions:
        """The same captions with padding beyond the longest one cut off."""
        n = int(self.mask.sum(1).max())
        return EncodedCaptions(*(x[:, :n] for x in (self.t, self.mask, self.tp, self.tq, self.u1t)))


class AttentionPool(nn.Module):
    """Self-attention pooling: ``a = softmax(w^T tanh(W_a x + b_a))``, returns ``sum a x``."""

    def __init__(self, d: int, d_a: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d_a)
        self.w = nn.Linear(d_a, 1, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (..., m, d), mask: broadcastable to (..., m) -> (..., d)."""
        logits = self.w(torch.tanh(self.proj(x))).squeeze(-1)  # (..., m)
        a = masked_softmax(logits, mask, dim=-1).to(x.dtype)  # (..., m)
        return (a.unsqueeze(-2) @ x).squeeze(-2)  # (..., d)


class FirstStage(nn.Module):
    """The first stage of retrieve-then-rerank: a vector from each side alone, so that an
    index can return candidates for SHAN to rerank (docs/search-and-serving.md).

    ``pool`` "max": each region (word) embedding is projected to D = ``dim`` and the side's
    vector is the element-wise max over its regions (words), unit length: each of the D
    features fires when any one fragment shows it, so an image keeps every object it holds
    (benchmarks/results/first_stage_cpu.txt: fitted afterwards at D 64, the caption's image is
    among the top 100 for 98.8 % of the demo's test captions, against 93.7 % for "attention").
    ``pool`` "attention": each side attention-pooled to one d-vector, then projected to D (the
    heads of checkpoints from before the choice). Trained beside SHAN on detached encodings
    (:func:`shan.loss.first_stage_loss`): SHAN's own weights and scores are the same with or
    without it.
    """

    def __init__(self, d: int, d_a: int, dim: int, pool: str = "max") -> None:
        super().__init__()
        if pool not in FIRST_STAGE_POOLS:
            raise ValueError(f"pool must be one of {FIRST_STAGE_POOLS}, got {pool!r}")
        self.pool = pool
        if pool == "attention":
            self.pool_v = AttentionPool(d, d_a)
            self.pool_t = AttentionPool(d, d_a)
        self.head_v = nn.Linear(d, dim)
        self.head_t = nn.Linear(d, dim)

    def images(self, v: Tensor, mask: Tensor) -> Tensor:
        """v: (Ni, k, d) region embeddings, mask: (Ni, k) -> (Ni, D) unit vectors."""
        if self.pool == "max":
            return l2norm(masked_max(self.head_v(v), mask))  # (Ni, D)
        return l2norm(self.head_v(self.pool_v(v, mask)))  # (Ni, D)

    def captions(self, t: Tensor, mask: Tensor) -> Tensor:
        """t: (Nc, n, d) word embeddings, mask: (Nc, n) -> (Nc, D) unit vectors."""
        if self.pool == "max":
            return l2norm(masked_max(self.head_t(t), mask))  # (Nc, D)
        return l2norm(self.head_t(self.pool_t(t, mask)))  # (Nc, D)


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """x: (..., m, D), mask: (..., m) bool with an entry kept in each row -> (..., D), the
    element-wise max over the kept entries."""
    return x.masked_fill(~mask[..., None], float("-inf")).amax(-2)


class SHAN(nn.Module):
    """Image and caption encoders plus the step-wise scorer.

    ``forward`` scores a training batch (every image against every caption) and returns the
    dict of :meth:`score`. ``glove`` is an optional ``(vocab_size, word_dim)`` matrix.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, glove: Tensor | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d
        # Encoders (docs/model.md §2)
        self.img_fc = nn.Linear(cfg.feature_dim, d)
        self.word_emb = nn.Embedding(vocab_size, cfg.word_dim, padding_idx=0)
        self.glove_emb = nn.Embedding(vocab_size, cfg.word_dim, padding_idx=0)
        self.has_glove = glove is not None  # GloVe rows given: never re-initialised
        if glove is not None:
            if tuple(glove.shape) != (vocab_size, cfg.word_dim):
                raise ValueError(
                    f"GloVe matrix has shape {tuple(glove.shape)}, "
                    f"expected ({vocab_size}, {cfg.word_dim})"
                )
            self.glove_emb.weight.data.copy_(torch.as_tensor(glove))
            self.glove_emb.weight.requires_grad_(not cfg.freeze_glove)
        elif cfg.glove_path is None:
            warnings.warn(
                "no GloVe vectors given: the GloVe half of the word embedding is learned",
                stacklevel=2,
            )
        self.gru = nn.GRU(2 * cfg.word_dim, d, batch_first=True, bidirectional=True)
        # L2L projections (docs/model.md §3)
        self.proj_v = nn.Linear(d, d, bias=False)  # W~v
        self.proj_t = nn.Linear(d, d, bias=False)  # W~t
        # G2L gates and pooling (docs/model.md §4): gate_v.weight = [P | Q], gate_t = [U1 | U2]
        self.gate_v = nn.Linear(2 * d, d)
        self.gate_t = nn.Linear(2 * d, d)
        self.pool_v = AttentionPool(d, cfg.d_a)
        self.pool_t = AttentionPool(d, cfg.d_a)
        self._init_weights()
        # The first stage (retrieve-then-rerank), created last and from its own seed: SHAN's
        # initial weights and the global random stream are the same with or without it.
        self.first_stage: FirstStage | None = None
        if cfg.first_stage_dim:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(FIRST_STAGE_SEED)
                self.first_stage = FirstStage(d, cfg.d_a, cfg.first_stage_dim, cfg.first_stage_pool)

    def _init_weights(self) -> None:
        r = (6.0 / (self.img_fc.in_features + self.img_fc.out_features)) ** 0.5
        nn.init.uniform_(self.img_fc.weight, -r, r)  # Xavier, as SCAN
        nn.init.zeros_(self.img_fc.bias)
        nn.init.uniform_(self.word_emb.weight, -0.1, 0.1)
        if not self.has_glove:  # given GloVe rows stay, frozen or fine-tuned (freeze_glove)
            nn.init.uniform_(self.glove_emb.weight, -0.1, 0.1)
        with torch.no_grad():
            self.word_emb.weight[0].zero_()

    # -- encoders ------------------------------------------------------------------------------
    def encode_images(self, features: Tensor, mask: Tensor | None = None) -> EncodedImages:
        """features: (Ni, k, F); mask: (Ni, k) bool, or (Ni,) region counts, or None (all)."""
        return self.image_terms(*self.embed_images(features, mask))

    def embed_images(self, features: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The image encoder alone: features (Ni, k, F), mask as :meth:`encode_images` ->
        v (Ni, k, d) unit region embeddings, mask (Ni, k) bool."""
        if features.dim() != 3 or features.shape[-1] != self.cfg.feature_dim:
            raise ValueError(
                f"features must be (Ni, k, {self.cfg.feature_dim}), got {tuple(features.shape)}"
            )
        ni, k, _ = features.shape
        mask = region_mask(mask, ni, k, features.device)
        v = l2norm(self.img_fc(features))  # (Ni, k, d)
        return v, mask

    def image_terms(self, v: Tensor, mask: Tensor) -> EncodedImages:
        """v: (Ni, k, d), mask: (Ni, k) -> the images with the scorer's per-image terms."""
        d = self.cfg.d
        vp = self.proj_v(v)  # (Ni, k, d)
        if self.cfg.affinity == "cosine":
            vp = l2norm(vp)
        w_p, w_q = self.gate_v.weight[:, :d], self.gate_v.weight[:, d:]  # P, Q: (d, d)
        w_u1, w_u2 = self.gate_t.weight[:, :d], self.gate_t.weight[:, d:]  # U1, U2: (d, d)
        del w_q, w_u1
        pv = F.linear(v, w_p, self.gate_v.bias)  # (Ni, k, d)
        vg = torch.cat([v, F.linear(v, w_u2)], dim=-1)  # (Ni, k, 2d)
        return EncodedImages(v=v, mask=mask, vp=vp, vg=vg, pv=pv)

    def encode_captions(self, tokens: Tensor, lengths: Tensor) -> EncodedCaptions:
        """tokens: (Nc, n) int ids, padded with 0; lengths: (Nc,) real lengths (>= 1)."""
        return self.caption_terms(*self.embed_captions(tokens, lengths))

    def embed_captions(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The caption encoder alone: tokens, lengths as :meth:`encode_captions` ->
        t (Nc, n, d) unit word embeddings (zero on padding), mask (Nc, n) bool."""
        nc, n = tokens.shape
        lengths = lengths.to(torch.long)
        if lengths.shape != (nc,) or lengths.min() < 1 or lengths.max() > n:
            raise ValueError(
                f"caption lengths must be (Nc,) = ({nc},) values in 1..{n}, got shape "
                f"{tuple(lengths.shape)} with range {lengths.min().item()}..{lengths.max().item()}"
            )
        emb = torch.cat([self.glove_emb(tokens), self.word_emb(tokens)], dim=-1)  # (Nc, n, 2w)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=n)  # (Nc, n, 2d)
        out = out.view(nc, n, 2, self.cfg.d).mean(dim=2)  # (Nc, n, d): mean of both directions
        mask = torch.arange(n, device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
        t = l2norm(out) * mask.unsqueeze(-1)  # (Nc, n, d), zero on padding
        return t, mask

    def caption_terms(self, t: Tensor, mask: Tensor) -> EncodedCaptions:
        """t: (Nc, n, d), mask: (Nc, n) -> the captions with the scorer's per-caption terms."""
        d = self.cfg.d
        tp = self.proj_t(t)  # (Nc, n, d)
        if self.cfg.affinity == "cosine":
            tp = l2norm(tp)
        w_q = self.gate_v.weight[:, d:]  # Q: (d, d)
        w_u1 = self.gate_t.weight[:, :d]  # U1: (d, d)
        tq = torch.cat([t, F.linear(t, w_q)], dim=-1)  # (Nc, n, 2d)
        u1t = F.linear(t, w_u1, self.gate_t.bias)  # (Nc, n, d)
        return EncodedCaptions(t=t, mask=mask, tp=tp, tq=tq, u1t=u1t)

    # -- first stage -------------------------------------------------------------------------
    def image_vectors(self, images: EncodedImages) -> Tensor:
        """Encoded images (Ni rows) -> (Ni, D) first-stage unit vectors."""
        return self._first_stage().images(images.v, images.mask)

    def caption_vectors(self, captions: EncodedCaptions) -> Tensor:
        """Encoded captions (Nc rows) -> (Nc, D) first-stage unit vectors."""
        return self._first_stage().captions(captions.t, captions.mask)

    def _first_stage(self) -> FirstStage:
        if self.first_stage is None:
            raise ValueError("this model has no first stage (model.first_stage_dim is 0)")
        return self.first_stage

    # -- scoring -------------------------------------------------------------------------------
    def score(
        self,
        images: EncodedImages,
        captions: EncodedCaptions,
        block: int | tuple[int, int] | None = None,
        checkpoint: bool = False,
    ) -> dict[str, Tensor]:
        """Score every image against every caption, ``block`` x ``block`` pairs at a time.

        Returns ``{"total", "l2l", "g2l", "g2g"}``, each (Ni, Nc). Memory holds one block's
        intermediates, about ``bi * bc * (k + n) * d`` floats times a small constant.
        The default block is 8 on CPU (cache-sized) and 64 on GPU.
        ``checkpoint`` recomputes each block in the backward pass instead of keeping it.
        """
        block = block or default_block(images.v.device)
        bi, bc = (block, block) if isinstance(block, int) else block
        # Captions sorted by length, so that each column block carries little padding.
        order = torch.argsort(captions.mask.sum(1), stable=True)
        rows = []
        for i0 in range(0, len(images), bi):
            cols = []
            for c0 in range(0, len(captions), bc):
                im, cap = images[i0 : i0 + bi], captions[order[c0 : c0 + bc]].trimmed()
                if checkpoint and torch.is_grad_enabled():
                    out = torch.utils.checkpoint.checkpoint(
                        self._score_block_tensor, *_flat(im, cap), use_reentrant=False
                    )
                else:
                    out = self._score_block_tensor(*_flat(im, cap))
                cols.append(out)  # (3, bi, bc)
            rows.append(torch.cat(cols, dim=2))
        steps = torch.cat(rows, dim=1)[:, :, torch.argsort(order)]  # (3, Ni, Nc), input order
        return self._with_total(steps)

    def _with_total(self, steps: Tensor) -> dict[str, Tensor]:
        c = self.cfg
        total = c.w_l2l * steps[0] + c.w_g2l * steps[1] + c.w_g2g * steps[2]
        return {"total": total, "l2l": steps[0], "g2l": steps[1], "g2g": steps[2]}

    def _score_block_tensor(self, *tensors: Tensor) -> Tensor:
        im, cap = _unflat(tensors)
        s = self.score_block(im, cap)
        return torch.stack([s["l2l"], s["g2l"], s["g2g"]])  # (3, bi, bc)

    def l2l_attention(self, im: EncodedImages, cap: EncodedCaptions) -> tuple[Tensor, Tensor]:
        """L2L attention of every pair of a block (docs/model.md §3), in at least float32:
        alpha (Bi*k, Bc, n), each region's weights over a caption's words; beta (Bi, k, Bc*n),
        each word's weights over an image's regions (sums over k are 1)."""
        bi, k, d = im.v.shape
        bc, n, _ = cap.t.shape
        aff = im.vp.reshape(bi * k, d) @ cap.tp.reshape(bc * n, d).T  # (Bi*k, Bc*n)
        logits = self.cfg.lambda_l2l * aff
        alpha = masked_softmax(logits.view(bi * k, bc, n), cap.mask[None], dim=-1)  # over words
        beta = masked_softmax(logits.view(bi, k, bc * n), im.mask[:, :, None], dim=1)  # regions
        return alpha, beta

    def score_block(self, im: EncodedImages, cap: EncodedCaptions) -> dict[str, Tensor]:
        """The fast path of docs/model.md §8 for one block: returns l2l, g2l, g2g, each (Bi, Bc).

        Image-side per-pair tensors are laid out (Bc, Bi, k, .) and text-side ones
        (Bi, Bc, n, .), the layouts the batched products produce, so nothing is transposed.
        """
        c = self.cfg
        bi, k, d = im.v.shape
        bc, n, _ = cap.t.shape
        v_flat, t_flat = im.v.reshape(bi * k, d), cap.t.reshape(bc * n, d)

        # Step 1, L2L. Attention of every region over every word of every pair, and back.
        alpha, beta = self.l2l_attention(im, cap)  # (Bi*k, Bc, n), (Bi, k, Bc*n)
        sim = v_flat @ t_flat.T  # (Bi*k, Bc*n): v_i . t_j
        alpha, beta = alpha.to(v_flat.dtype), beta.to(v_flat.dtype)
        a_c = alpha.transpose(0, 1)  # (Bc, Bi*k, n)
        b_i = beta.transpose(1, 2)  # (Bi, Bc*n, k)
        # Attended captions per region, and their gate term: alpha @ [t ; Q t].
        tq_star = (a_c @ cap.tq).view(bc, bi, k, 2 * d)  # (Bc, Bi, k, 2d)
        t_star, qt_star = tq_star[..., :d], tq_star[..., d:]
        # Attended images per word, and their gate term: beta^T @ [v ; U2 v].
        vg_star = (b_i @ im.vg).view(bi, bc, n, 2 * d)  # (Bi, Bc, n, 2d)
        v_star, u2v_star = vg_star[..., :d], vg_star[..., d:]
        # R_v = cos(v_i, t*_i) without touching t*: v_i . t*_i = sum_j alpha_ij (v_i . t_j) and
        # |t*_i|^2 = alpha_i G alpha_i^T with the caption's Gram matrix G = T T^T.
        vt = (alpha * sim.view(bi * k, bc, n)).sum(-1)  # (Bi*k, Bc)
        gram_t = cap.t @ cap.t.transpose(1, 2)  # (Bc, n, n)
        tt = ((a_c @ gram_t) * a_c).sum(-1).T  # (Bi*k, Bc): |t*_i|^2
        r_v = vt / (im.v.norm(dim=-1).reshape(bi * k, 1) * tt.clamp_min(0).sqrt() + EPS)
        r_v = r_v.view(bi, k, bc).transpose(1, 2)  # (Bi, Bc, k)
        tv = (beta * sim.view(bi, k, bc * n)).sum(1)  # (Bi, Bc*n): t_j . v*_j
        gram_v = im.v @ im.v.transpose(1, 2)  # (Bi, k, k)
        vv = ((gram_v @ beta) * beta).sum(1)  # (Bi, Bc*n): |v*_j|^2
        r_t = tv / (cap.t.norm(dim=-1).reshape(1, bc * n) * vv.clamp_min(0).sqrt() + EPS)
        r_t = r_t.view(bi, bc, n)  # (Bi, Bc, n)
        m_v, m_t = im.mask[:, None, :], cap.mask[None, :, :]  # (Bi, 1, k), (1, Bc, n)
        mu_v, mu_t = self._direction_weights(c.mu)
        s_l2l = mu_v * masked_mean(r_v, m_v, -1) + mu_t * masked_mean(r_t, m_t, -1)  # (Bi, Bc)

        # Step 2, G2L. Gated fusion (the gates' linear parts were precomputed), then pooling.
        vc = _gated_fusion(im.v[None], t_star, qt_star, im.pv[None])  # (Bc, Bi, k, d)
        tc = _gated_fusion(cap.t[None], v_star, u2v_star, cap.u1t[None])  # (Bi, Bc, n, d)
        v_c = self.pool_v(vc, im.mask[None]).transpose(0, 1)  # (Bi, Bc, d)
        t_c = self.pool_t(tc, m_t)  # (Bi, Bc, d)
        # Global-to-local attention: the pooled image over the words, the pooled caption over
        # the regions.
        cos_vt = torch.einsum("icd,cnd->icn", l2norm(v_c), cap.t)  # (Bi, Bc, n)
        w_t = masked_softmax(c.lambda_g2l * cos_vt, m_t, dim=-1).to(v_c.dtype)
        t_star_c = torch.einsum("icn,cnd->icd", w_t, cap.t)  # (Bi, Bc, d)
        cos_tv = torch.einsum("icd,ikd->ick", l2norm(t_c), im.v)  # (Bi, Bc, k)
        w_v = masked_softmax(c.lambda_g2l * cos_tv, m_v, dim=-1).to(t_c.dtype)
        v_star_c = torch.einsum("ick,ikd->icd", w_v, im.v)  # (Bi, Bc, d)
        g_v, g_t = self._direction_weights(0.5)
        s_g2l = g_v * _cos(v_c, t_star_c) + g_t * _cos(t_c, v_star_c)  # (Bi, Bc)

        # Step 3, G2G.
        s_g2g = _cos(v_c + t_star_c, t_c + v_star_c)  # (Bi, Bc)
        return {"l2l": s_l2l, "g2l": s_g2l, "g2g": s_g2g}

    def _direction_weights(self, w_image: float) -> tuple[float, float]:
        """(image-side, text-side) weights: the paper's I2T and T2I keep one side only."""
        if self.cfg.direction == "i2t":
            return 1.0, 0.0
        if self.cfg.direction == "t2i":
            return 0.0, 1.0
        return w_image, 1.0 - w_image

    def forward(
        self,
        features: Tensor,
        region_mask: Tensor | None,
        tokens: Tensor,
        lengths: Tensor,
        *,
        block: int | tuple[int, int] | None = None,
        checkpoint: bool = False,
    ) -> dict[str, Tensor]:
        """A training batch: B images (one per caption) against the B captions -> (B, B) each."""
        images = self.encode_images(features, region_mask)
        captions = self.encode_captions(tokens, lengths)
        return self.score(images, captions, block=block, checkpoint=checkpoint)


def _gated_fusion(own: Tensor, attended: Tensor, gate_attended: Tensor, gate_own: Tensor) -> Tensor:
    """``g * own + (1 - g) * attended`` with ``g = sigmoid(gate_own + gate_attended)``.

    Without autograd the attended tensors (fresh per block) are overwritten, saving two
    allocations and memory passes per block.
    """
    own = own.to(attended.dtype)  # under autocast the unit vectors stay float32
    if torch.is_grad_enabled():
        return torch.lerp(attended, own, torch.sigmoid(gate_attended + gate_own))
    return attended.lerp_(own, gate_attended.add_(gate_own).sigmoid_())


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity along the last dimension (broadcasting)."""
    num = (a * b).sum(-1)
    return num / (a.norm(dim=-1) * b.norm(dim=-1) + EPS)


def _flat(im: EncodedImages, cap: EncodedCaptions) -> tuple[Tensor, ...]:
    return (im.v, im.mask, im.vp, im.vg, im.pv, cap.t, cap.mask, cap.tp, cap.tq, cap.u1t)


def _unflat(t: tuple[Tensor, ...]) -> tuple[EncodedImages, EncodedCaptions]:
    return EncodedImages(*t[:5]), EncodedCaptions(*t[5:])


def default_block(device: torch.device) -> int:
    """Pairs per block side: small on CPU so a block's tensors stay in cache."""
    return 64 if device.type == "cuda" else 8


def region_mask(mask: Tensor | None, ni: int, k: int, device: torch.device) -> Tensor:
    """Normalise a region mask given as None, (Ni,) counts or (Ni, k) bools to (Ni, k) bools."""
    if mask is None:
        return torch.ones(ni, k, dtype=torch.bool, device=device)
    mask = mask.to(device)
    if mask.dim() == 1:
        if mask.shape[0] != ni:
            raise ValueError(f"region counts have shape {tuple(mask.shape)}, expected ({ni},)")
        return torch.arange(k, device=device)[None, :] < mask[:, None]
    if tuple(mask.shape) != (ni, k):
        raise ValueError(f"region mask has shape {tuple(mask.shape)}, expected ({ni}, {k})")
    return mask.bool()


def build_model(cfg: ModelConfig, vocab: Vocabulary | int, glove: Tensor | None = None) -> SHAN:
    """A SHAN for ``vocab`` (a Vocabulary or a size); loads ``cfg.glove_path`` when set."""
    size = vocab if isinstance(vocab, int) else len(vocab)
    if glove is None and cfg.glove_path is not None:
        from shan.glove import load_glove

        if isinstance(vocab, int):
            raise ValueError("loading GloVe vectors needs the Vocabulary, not only its size")
        glove = torch.from_numpy(load_glove(cfg.glove_path, vocab, cfg.word_dim))
    return SHAN(cfg, size, glove=glove)
