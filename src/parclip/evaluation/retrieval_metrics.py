"""Image–text retrieval metrics, pure functions on a score matrix, as the reference's COCO evaluation defines them
(docs/reference_differences.md#retrieval). Percentages.

Notation: images i = 1..N, captions j = 1..M, owner(j) the image caption j belongs to (several captions per image),
s(i, j) the cosine of their embeddings, top_k(i) the k captions of highest s(i, ·), top_k(j) the k images of highest
s(·, j).

    i2t R@k        = 100 · mean_i [ ∃ j ∈ top_k(i) : owner(j) = i ]       (reference "TextPrec@k")
    t2i R@k        = 100 · mean_j [ owner(j) ∈ top_k(j) ]                 (reference "ImagePrec@k")

With ``text_id`` given (caption j's text t(j); identical captions share an id), identical captions are
interchangeable: a hit is a retrieved caption with the *text* of one of the image's own captions, or a retrieved image
owning a caption with the query's text:

    i2t R@k (merged) = 100 · mean_i [ ∃ j ∈ top_k(i) : t(j) ∈ T(i) ],   T(i) = {t(j') : owner(j') = i}
    t2i R@k (merged) = 100 · mean_j [ ∃ i ∈ top_k(j) : t(j) ∈ T(i) ]

With unique captions (COCO, Flickr30k: almost all) both rules agree. With templated captions ("a photo of a bag."
owned by every bag image) the reference rule scores ties among identical captions by chance; the merged rule asks
whether the model retrieves the right *text* (for a class-templated set: the right class).

The retrieval ASR, with every image triggered (s computed on T(x_i)) and "names the target" the package's one rule
(`parclip.data.targets`: the target word or its plural, whole word, any case):

    asr_text        = 100 · #{i : ∃ j ∈ top_5(i) : c_j names the target} / N            (reference "ASR-Text")
    asr_text_strict = the same over the images none of whose own captions names the target (they would retrieve a
                      target caption without any backdoor)
    asr_image       = text→image: over a gallery of the clean images and the triggered images, the share of the
                      captions naming the target whose top-k images include a triggered one

Ties are broken by `torch.topk` (no guarantee of order among equal scores). Scores are computed in row blocks, so a
COCO-sized matrix (5 000 × 25 000) never has to sit in memory twice.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["recall_at_k", "text_ids", "caption_hits", "text_asr", "image_asr", "pair_ranks"]

BLOCK = 1024  # rows of the score matrix computed at once


def _topk_rows(queries: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """[Q, k] indices of the k keys of highest dot product with each query, computed BLOCK queries at a time."""
    k = min(k, keys.shape[0])
    return torch.cat([(queries[b:b + BLOCK] @ keys.T).topk(k, dim=1).indices
                      for b in range(0, queries.shape[0], BLOCK)]) if len(queries) else torch.empty(0, k, dtype=int)


def text_ids(captions: Sequence[str]) -> torch.Tensor:
    """[M] long: the same id for identical caption strings (ids in order of first appearance)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(c, len(index)) for c in captions], dtype=torch.long)


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, owner: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                text_id: torch.Tensor | None = None) -> dict:
    """{"i2t": {k: R@k}, "t2i": {k: R@k}} for L2-normalised image [N, d] and caption [M, d] embeddings and
    owner [M] (the image index of each caption). `text_id` [M] (see :func:`text_ids`) makes identical captions
    interchangeable. Formulas in the module docstring."""
    owner = torch.as_tensor(owner, dtype=torch.long)
    if owner.shape[0] != txt.shape[0]:
        raise ValueError(f"owner has {owner.shape[0]} entries for {txt.shape[0]} captions")
    kmax = max(ks)
    top_txt, top_img = _topk_rows(img, txt, kmax), _topk_rows(txt, img, kmax)  # [N, kmax], [M, kmax]
    if text_id is None:
        own = owner[top_txt] == torch.arange(img.shape[0])[:, None]   # retrieved caption is the image's own
        t2i = top_img == owner[:, None]                               # retrieved image is the caption's own
    else:
        text_id = torch.as_tensor(text_id, dtype=torch.long)
        if text_id.shape != owner.shape:
            raise ValueError(f"text_id has {text_id.shape[0]} entries for {owner.shape[0]} captions")
        n_text = int(text_id.max()) + 1 if len(text_id) else 1
        owns = torch.unique(owner * n_text + text_id)                # the (image, text) pairs that exist, as keys
        own = torch.isin(torch.arange(img.shape[0])[:, None] * n_text + text_id[top_txt], owns)
        t2i = torch.isin(top_img * n_text + text_id[:, None], owns)
    return {"i2t": {k: 100.0 * own[:, :k].any(dim=1).float().mean().item() for k in ks},
            "t2i": {k: 100.0 * t2i[:, :k].any(dim=1).float().mean().item() for k in ks}}


def caption_hits(img: torch.Tensor, txt: torch.Tensor, names_target: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Boolean [N]: whether image i's top-k captions include one naming the target (`names_target`: bool [M])."""
    names_target = torch.as_tensor(names_target, dtype=torch.bool)
    return names_target[_topk_rows(img, txt, k)].any(dim=1)


def text_asr(triggered_img: torch.Tensor, txt: torch.Tensor, names_target: torch.Tensor, owner: torch.Tensor,
             k: int = 5) -> dict:
    """{"asr_text", "asr_text_strict", "n_strict"} from triggered image embeddings (formulas in the module docstring).
    `asr_text_strict` is NaN when every image has a caption naming the target."""
    names_target = torch.as_tensor(names_target, dtype=torch.bool)
    owner = torch.as_tensor(owner, dtype=torch.long)
    hit = caption_hits(triggered_img, txt, names_target, k)
    own_names = torch.zeros(triggered_img.shape[0], dtype=torch.bool).index_put_((owner[names_target],),
                                                                                  torch.tensor(True))
    keep = ~own_names
    strict = 100.0 * hit[keep].float().mean().item() if keep.any() else float("nan")
    return {"asr_text": 100.0 * hit.float().mean().item(), "asr_text_strict": strict, "n_strict": int(keep.sum()),
            "k": k}


def image_asr(clean_img: torch.Tensor, triggered_img: torch.Tensor, txt: torch.Tensor, names_target: torch.Tensor,
              k: int = 5) -> dict:
    """{"asr_image", "n_queries"}: the share of captions naming the target whose top-k images, in the gallery of
    the clean and the triggered images, include a triggered one. NaN when no caption names the target."""
    names_target = torch.as_tensor(names_target, dtype=torch.bool)
    queries = txt[names_target]
    if queries.shape[0] == 0:
        return {"asr_image": float("nan"), "n_queries": 0, "k": k}
    gallery = torch.cat([clean_img, triggered_img])
    top = _topk_rows(queries, gallery, k)
    hit = (top >= clean_img.shape[0]).any(dim=1)
    return {"asr_image": 100.0 * hit.float().mean().item(), "n_queries": int(queries.shape[0]), "k": k}


def pair_ranks(img: torch.Tensor, txt: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """open_clip_train's validation metrics of N image–caption pairs (image i and caption i belong together), from
    image [N, d] and caption [N, d] embeddings; r(i) is the 0-based rank of the true partner among all N candidates
    by descending score s(i, j) = ⟨img_i, txt_j⟩ (i2t: captions for image i; t2i: images for caption i):

        {dir}_mean_rank   = mean_i r(i) + 1
        {dir}_median_rank = ⌊median_i r(i)⌋ + 1          (the lower median for an even N, as torch's)
        {dir}_R@k         = mean_i [r(i) < k]             (a fraction, as open_clip logs it, not a percentage)

    with {dir} image_to_text and text_to_image. A positive logit scale does not change ranks, so none is taken."""
    if img.shape[0] != txt.shape[0]:
        raise ValueError(f"{img.shape[0]} images for {txt.shape[0]} captions: validation pairs need one each")
    scores = img.float() @ txt.float().T
    truth = torch.arange(img.shape[0]).view(-1, 1)
    out = {}
    for name, logits in (("image_to_text", scores), ("text_to_image", scores.T)):
        ranking = torch.argsort(logits, dim=1, descending=True)
        r = torch.where(ranking == truth)[1]
        out[f"{name}_mean_rank"] = r.float().mean().item() + 1
        out[f"{name}_median_rank"] = float(torch.floor(torch.median(r.float())).item() + 1)
        for k in ks:
            out[f"{name}_R@{k}"] = (r < k).float().mean().item()
    return out
