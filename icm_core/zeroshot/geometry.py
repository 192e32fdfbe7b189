"""How much the task vectors say about the adapters: the analysis behind a zero-shot result.

A generator conditioned on task vectors can beat the mean adapter on a category it never saw only if categories
whose vectors are close also have adapters that are close, or that work on each other's text. This module
measures that on a library of final LoRAs and task vectors, without training anything:

- **vector vs adapter**: the rank correlation, over category pairs, between the cosine of two task vectors and the
  cosine of the two adapters' weight changes ``dW = s * B @ A``, with a Mantel permutation p-value (category labels
  shuffled, so pairs that share a category are not treated as independent);
- **vector vs transfer** (with the cross-category matrix): the same against how much of a target's own LoRA gain
  the source's LoRA recovers on the target's text, and the transfer of the nearest category by task vector against
  the best and the typical other category: the ceiling of any adapter retrieved by this vector;
- **the library's reach** in weight space, each category left out in turn: the cosine of its adapter to what the
  mean LoRA, the 1-NN and the softmax k-NN by task vector build from the others, against two oracles that know the
  held-out adapter: the single closest other adapter, and the best linear combination of all the others (the
  projection onto their span, the most any weighted mean of library adapters can hold);
- **families**: mean similarity within a family against across families.

Inner products of weight changes come from the low-rank factors (``r x r`` products per module), never from the
dense ``dW``, so the analysis costs the same for an 8B model's adapters as for a 135M model's.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from icm_core.lora.arithmetic import lora_scaling, scaled_factors
from icm_core.zeroshot.config import ZeroShotConfig
from icm_core.zeroshot.protocol import knn_weights


Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Per adapted module, ``(B, A)`` with peft's scaling folded into ``B``: ``dW = B @ A``."""


def lora_factors(state_dict: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> Factors:
    """An adapter's weight change as low-rank factors (float64), module by module."""
    return scaled_factors(state_dict, lora_scaling(adapter_config))


def delta_inner(x: Factors, y: Factors) -> float:
    """Frobenius inner product ``sum_m <B_x A_x, B_y A_y>`` from the factors: ``sum((B_x^T B_y) * (A_x A_y^T))``.

    Raises:
        ValueError: the adapters adapt different modules, or a module's shapes differ.
    """
    if x.keys() != y.keys():
        raise ValueError(f"adapters adapt different modules: {sorted(x.keys() ^ y.keys())[:3]}")
    total = 0.0
    for module, (bx, ax) in x.items():
        by, ay = y[module]
        if bx.shape[0] != by.shape[0] or ax.shape[1] != ay.shape[1]:
            raise ValueError(f"module {module}: weight change shapes {bx.shape[0]}x{ax.shape[1]} and "
                             f"{by.shape[0]}x{ay.shape[1]} differ")  # fmt: skip
        total += float(((bx.T @ by) * (ax @ ay.T)).sum())
    return total


def adapter_gram(adapters: Sequence[Factors]) -> torch.Tensor:
    """``G[i, j] = <dW_i, dW_j>`` (float64, symmetric)."""
    n = len(adapters)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = delta_inner(adapters[i], adapters[j])
    return gram


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from a Gram matrix (a zero row stays zero)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    scale = torch.outer(norms, norms)
    return torch.where(scale > 0, gram / scale.clamp_min(1e-300), torch.zeros_like(gram))


def vector_cosines(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities of the rows of ``vectors`` [N, D] (float64)."""
    rows = vectors.double()
    return cosine_from_gram(rows @ rows.T)


def combination_cosine(gram: torch.Tensor, target: int, weights: Mapping[int, float]) -> float:
    """Cosine of adapter ``target`` to ``sum_j w_j dW_j``, from the Gram matrix (0 for a zero combination)."""
    idx = list(weights)
    w = torch.tensor([weights[j] for j in idx], dtype=torch.float64)
    inner = float(w @ gram[target, idx])
    norm_sq = float(w @ gram[idx][:, idx] @ w) * float(gram[target, target])
    return inner / math.sqrt(norm_sq) if norm_sq > 0 else 0.0


def span_cosine(gram: torch.Tensor, target: int, others: Sequence[int]) -> float:
    """Cosine of adapter ``target`` to its projection onto the span of ``others``' weight changes: the most any
    linear combination of them holds of it (least squares on the Gram matrix)."""
    idx = list(others)
    g = gram[idx, target]
    projected_sq = float(g @ torch.linalg.pinv(gram[idx][:, idx], hermitian=True) @ g)
    own = float(gram[target, target])
    return math.sqrt(min(max(projected_sq / own, 0.0), 1.0)) if own > 0 else 0.0


def library_reach(
    names: Sequence[str],
    vectors: Mapping[str, torch.Tensor],
    gram: torch.Tensor,
    k: int,
    temperature: float,
    cosine: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Each category left out in turn, with all the others as the library: the weight-space cosine of its adapter
    to the mean LoRA, the 1-NN and the softmax k-NN (by ``vectors``, as the leave-out baselines pick them), and to
    two oracles: the closest single other adapter, and the projection onto the span of all the others
    (``cosine``: :func:`cosine_from_gram` of ``gram``, when the caller has it already)."""
    per_category: dict[str, dict[str, float]] = {}
    cosine = cosine_from_gram(gram) if cosine is None else cosine
    for i, name in enumerate(names):
        others = [j for j in range(len(names)) if j != i]
        keys = {names[j]: vectors[names[j]] for j in others}
        nn1 = knn_weights(vectors[name], keys, 1, None)
        knn = knn_weights(vectors[name], keys, k, temperature)
        per_category[name] = {
            "mean_lora": combination_cosine(gram, i, {j: 1 / len(others) for j in others}),
            "nn1": combination_cosine(gram, i, {names.index(n): w for n, w in nn1.items()}),
            "knn_softmax": combination_cosine(gram, i, {names.index(n): w for n, w in knn.items()}),
            "best_single_oracle": max(float(cosine[i, j]) for j in others),
            "span_oracle": span_cosine(gram, i, others),
        }
    methods = next(iter(per_category.values())).keys()
    return {
        "mean": {m: statistics.fmean(c[m] for c in per_category.values()) for m in methods},
        "per_category": per_category,
    }


def rank(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson on tie-averaged ranks); None with fewer than 3 points or no spread."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} and {len(y)} values")
    if len(x) < 3:
        return None
    rx, ry = rank(x), rank(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / (sxx * syy) ** 0.5


def _pairs(n: int, symmetric: bool) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(n) if (i < j if symmetric else i != j)]


def mantel(
    a: Sequence[Sequence[float | None]],
    b: Sequence[Sequence[float | None]],
    permutations: int = 999,
    seed: int = 0,
    symmetric: bool = True,
) -> dict[str, Any]:
    """Spearman correlation of two category-by-category matrices over their off-diagonal pairs, and its Mantel
    permutation p-value: the share of label permutations of ``b`` (rows and columns together) whose correlation is
    at least the observed one (one-sided, counting the observed), so pairs sharing a category are not taken as
    independent. ``symmetric`` uses each unordered pair once; otherwise every ordered pair (e.g. a transfer
    matrix, target by source). Pairs where either matrix has None are left out."""
    n = len(a)
    if len(b) != n or any(len(row) != n for row in (*a, *b)):
        raise ValueError("mantel: both matrices must be N x N over the same categories")
    pairs = _pairs(n, symmetric)

    def corr(perm: Sequence[int]) -> float | None:
        kept = [(a[i][j], b[perm[i]][perm[j]]) for i, j in pairs]
        kept = [(x, y) for x, y in kept if x is not None and y is not None]
        return spearman([x for x, _ in kept], [y for _, y in kept]) if kept else None

    identity = list(range(n))
    observed = corr(identity)
    used = sum(a[i][j] is not None and b[i][j] is not None for i, j in pairs)
    if observed is None:
        return {"spearman": None, "p_value": None, "pairs": used, "permutations": 0}
    rng = random.Random(seed)
    at_least = 1
    for _ in range(permutations):
        perm = identity[:]
        rng.shuffle(perm)
        value = corr(perm)
        at_least += value is not None and value >= observed
    return {"spearman": observed, "p_value": at_least / (permutations + 1), "pairs": used,
            "permutations": permutations}  # fmt: skip


def _nearest(similarity: torch.Tensor, i: int) -> int:
    row = similarity[i].clone()
    row[i] = float("-inf")
    return int(row.argmax())


def neighbour_transfer(
    names: Sequence[str], similarity: torch.Tensor, share: Mapping[str, Mapping[str, float | None]]
) -> dict[str, Any]:
    """What the nearest category by ``similarity`` is worth on a target's text: its LoRA's share of the target's
    own gain, against the best and the median other category's, and its rank among all other sources (1 = best).
    Targets whose own LoRA did not beat the base model (shares None) are left out."""
    per_target: dict[str, dict[str, Any]] = {}
    for i, target in enumerate(names):
        others = {s: share[target][s] for s in names if s != target}
        if any(v is None for v in others.values()) or not others:
            continue
        nearest = names[_nearest(similarity, i)]
        ordered = sorted(others, key=lambda s: -others[s])
        per_target[target] = {
            "nearest": nearest,
            "nearest_share": others[nearest],
            "best": ordered[0],
            "best_share": others[ordered[0]],
            "median_share": statistics.median(others.values()),
            "nearest_rank": ordered.index(nearest) + 1,
        }
    if not per_target:
        return {"targets": 0, "per_target": {}}
    cells = per_target.values()
    return {
        "targets": len(per_target),
        "mean_nearest_share": statistics.fmean(c["nearest_share"] for c in cells),
        "mean_best_share": statistics.fmean(c["best_share"] for c in cells),
        "mean_median_share": statistics.fmean(c["median_share"] for c in cells),
        "nearest_is_best": sum(c["nearest_rank"] == 1 for c in cells) / len(per_target),
        "nearest_in_top3": sum(c["nearest_rank"] <= 3 for c in cells) / len(per_target),
        "per_target": per_target,
    }


def family_contrast(
    names: Sequence[str], similarity: torch.Tensor, families: Mapping[str, str | None]
) -> dict[str, float | None]:
    """Mean off-diagonal similarity within a family and across families (None where no such pair exists)."""
    within, across = [], []
    for i, j in _pairs(len(names), symmetric=True):
        fi, fj = families.get(names[i]), families.get(names[j])
        if fi is None or fj is None:
            continue
        (within if fi == fj else across).append(float(similarity[i, j]))
    return {
        "within": statistics.fmean(within) if within else None,
        "across": statistics.fmean(across) if across else None,
    }


def _off_diagonal(matrix: torch.Tensor) -> dict[str, float]:
    values = [float(matrix[i, j]) for i, j in _pairs(matrix.shape[0], symmetric=True)]
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def _rows(matrix: torch.Tensor) -> list[list[float]]:
    return [[float(v) for v in row] for row in matrix]


def condition_geometry(
    vectors: Mapping[str, torch.Tensor],
    adapters: Mapping[str, Factors],
    share: Mapping[str, Mapping[str, float | None]] | None = None,
    families: Mapping[str, str | None] | None = None,
    permutations: int = 999,
    seed: int = 0,
    knn_k: int = ZeroShotConfig().knn_k,
    knn_temperature: float = ZeroShotConfig().knn_temperature,
) -> dict[str, Any]:
    """The whole analysis over the categories that have both a task vector and an adapter.

    Args:
        vectors: Task vector per category (the kind the generator is conditioned on).
        adapters: Final LoRA per category, as :func:`lora_factors`.
        share: The cross-category matrix's shares (``{target: {source: share}}``,
            :func:`icm_core.zeroshot.protocol`), for the transfer analysis; optional.
        families: Category family per category, for the within/across contrast; optional.
        permutations: Mantel permutations.
        seed: Seed of the permutations.
        knn_k: Neighbours of the softmax k-NN in the library's reach (as ``zeroshot.knn_k``).
        knn_temperature: Its softmax temperature (as ``zeroshot.knn_temperature``).

    Returns:
        ``{"categories", "vector_cosine", "adapter_cosine", "vector_vs_adapter", "library_reach", ...}``,
        with ``"vector_vs_transfer"``, ``"adapter_vs_transfer"``, ``"retrieval"`` and the transfer matrix when
        ``share`` is given and ``"families"`` when ``families`` is. Matrices are in ``categories`` order.

    Raises:
        ValueError: fewer than three categories in common.
    """
    names = sorted(set(vectors) & set(adapters) & (set(share) if share is not None else set(vectors)))
    if len(names) < 3:
        raise ValueError(f"condition geometry needs at least 3 categories with a vector and an adapter, got {names}")
    flat = {n: vectors[n].flatten().double() for n in names}
    vec = vector_cosines(torch.stack([flat[n] for n in names]))
    gram = adapter_gram([adapters[n] for n in names])
    ada = cosine_from_gram(gram)
    result: dict[str, Any] = {
        "categories": names,
        "vector_cosine": _off_diagonal(vec),
        "adapter_cosine": _off_diagonal(ada),
        "vector_vs_adapter": mantel(_rows(vec), _rows(ada), permutations, seed),
        "library_reach": library_reach(names, flat, gram, knn_k, knn_temperature, ada),
        "matrices": {"vector_cosine": _rows(vec), "adapter_cosine": _rows(ada)},
    }
    if share is not None:
        transfer = [[None if t == s else share[t][s] for s in names] for t in names]
        result["matrices"]["transfer"] = transfer
        result["vector_vs_transfer"] = mantel(_rows(vec), transfer, permutations, seed, symmetric=False)
        result["adapter_vs_transfer"] = mantel(_rows(ada), transfer, permutations, seed, symmetric=False)
        result["retrieval"] = {
            "by_task_vector": neighbour_transfer(names, vec, share),
            "by_adapter": neighbour_transfer(names, ada, share),
        }
    if families is not None:
        result["families"] = {
            "vector_cosine": family_contrast(names, vec, families),
            "adapter_cosine": family_contrast(names, ada, families),
        }
    return result


__all__ = [
    "Factors",
    "adapter_gram",
    "combination_cosine",
    "condition_geometry",
    "cosine_from_gram",
    "delta_inner",
    "family_contrast",
    "library_reach",
    "lora_factors",
    "mantel",
    "neighbour_transfer",
    "rank",
    "span_cosine",
    "spearman",
    "vector_cosines",
]
