"""Weighted k-nearest-neighbour classification of frozen features (the k-NN protocol of Wu et al. 2018,
"Unsupervised Feature Learning via Non-Parametric Instance Discrimination", as used by DINO).

Features are L2-normalised, so the similarity is the cosine. Each query takes the ``k`` most similar
features of the memory bank (the training split); neighbour ``i`` votes for its class with the weight
``exp(s_i / T)``. The class probability is the class's share of the summed weights; the prediction is
the class with the largest share. Computed as a softmax of ``s / T`` over the ``k`` neighbours, which
gives the same shares without ever forming ``exp(1 / T)`` (1.6e6 for T = 0.07).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_class_probabilities(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                            num_classes: int, k: int = 20, temperature: float = 0.07,
                            chunk_size: int = 4096) -> torch.Tensor:
    """Vote shares (N_queries, num_classes), rows summing to 1.

    Args:
        bank: (N, D) features of the labelled memory bank.
        bank_labels: (N,) integer classes in ``[0, num_classes)``.
        queries: (M, D) features to classify.
        k: neighbours per query (at most N: a smaller bank uses all of it).
        temperature: T of the weights ``exp(similarity / T)``.
        chunk_size: queries per similarity block (bounds the memory to chunk_size x N).
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be (N, D) and (M, D)")
    if len(bank) == 0 or len(bank_labels) != len(bank):
        raise ValueError(f"the memory bank needs features with one label each; got {len(bank)} features and "
                         f"{len(bank_labels)} labels")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and a temperature > 0; got k={k}, T={temperature}")
    bank_labels = bank_labels.to(bank.device, torch.int64)
    if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
        raise ValueError(f"bank labels must lie in [0, {num_classes})")
    k = min(k, len(bank))
    bank = F.normalize(bank.float(), dim=1)
    out = []
    for start in range(0, len(queries), chunk_size):
        chunk = F.normalize(queries[start:start + chunk_size].to(bank.device).float(), dim=1)
        similarity, neighbours = (chunk @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).softmax(dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=bank.device)
        out.append(votes.scatter_add_(1, bank_labels[neighbours], weights))
    if not out:
        return torch.zeros(0, num_classes)
    return torch.cat(out)
