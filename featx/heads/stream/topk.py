"""Exact cosine top-k search in blocks, and the one choice between faiss and torch for it.

Why one module: the streamed kNN (:mod:`featx.heads.stream.knn`) and the audit's neighbours
(:func:`featx.audit.finders.nearest_in_class`) both search L2-normalised rows for their ``k`` most
similar reference rows without holding a whole similarity matrix: each block of reference rows is
searched for the queries (faiss's flat index when installed and chosen, else torch matrix products
and ``topk``) and every query keeps a running top-k.  The search is exact (float32 inner products).
"""

from __future__ import annotations

import numpy as np

from ...base.choices import SEARCH_BACKENDS
from ...base.errors import FeatxError
from ..tuning.memory import available_bytes

# Similarities computed at once (query rows x reference rows of one product).
SIM_FLOATS = 16 << 20
# What a search may be asked to use: one of SEARCH_BACKENDS, or auto (faiss when installed, else torch).
BACKENDS = ("auto", *SEARCH_BACKENDS)


def search_backend(backend: str = "auto", *, option: str = "kNN backend") -> str:
    """"faiss" when asked or (``auto``) installed, else "torch"; ``option`` names the setting in errors."""
    if backend not in BACKENDS:
        raise FeatxError(f"{option} {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    try:
        import faiss  # noqa: F401 - optional: the flat index's kernels
    except ImportError:
        if backend == "faiss":
            raise FeatxError(f"{option} faiss: faiss is not installed; pip install 'featx[faiss]' or use "
                             f"{option} torch") from None
        return "torch"
    return "faiss"


def budget(nbytes: int, share: int) -> int:
    """``nbytes``, or 1/``share`` of the memory this process may still use when that is less."""
    free = available_bytes()
    return nbytes if free is None else min(nbytes, free // share)


def block_topk(Q: np.ndarray, R: np.ndarray, k: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, row in ``R``) of the ``k`` most similar rows of ``R`` for each row of ``Q``, best first."""
    k = min(k, len(R))
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(R.shape[1])
        index.add(np.ascontiguousarray(R))
        s, i = index.search(np.ascontiguousarray(Q), k)
        return s, i.astype(np.int64)
    import torch

    step = max(1, budget(SIM_FLOATS * 4, 32) // (4 * max(1, len(R))))
    Rt = torch.from_numpy(np.ascontiguousarray(R))
    out_s, out_i = np.empty((len(Q), k), np.float32), np.empty((len(Q), k), np.int64)
    with torch.no_grad():
        for a in range(0, len(Q), step):
            v, i = torch.topk(torch.from_numpy(Q[a : a + step]) @ Rt.T, k, dim=1, largest=True, sorted=True)
            out_s[a : a + step], out_i[a : a + step] = v.numpy(), i.numpy()
    return out_s, out_i


def merge_topk(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray) -> None:
    """Keep in ``best_s``/``best_i`` (in place) the best of both neighbour lists, best first."""
    k = best_s.shape[1]
    cs, ci = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
    order = np.argsort(-cs, axis=1, kind="stable")[:, :k]  # ties: the earlier (lower) reference row first
    best_s[:], best_i[:] = np.take_along_axis(cs, order, 1), np.take_along_axis(ci, order, 1)


def search(Q: np.ndarray, q_fold: np.ndarray, blocks, k: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, reference position) of each query's ``k`` nearest reference rows, best first.

    ``Q``: normalised query rows; ``blocks``: (positions, normalised rows, folds) of the reference, read
    one at a time.  A query of fold f only sees reference rows of other folds (CV; -1 everywhere: all).
    Missing neighbours have position -1 and similarity -inf.
    """
    best_s = np.full((len(Q), k), -np.inf, np.float32)
    best_i = np.full((len(Q), k), -1, np.int64)
    for pos, R, r_fold in blocks:
        for f in np.unique(q_fold):
            qs, rs = np.flatnonzero(q_fold == f), np.flatnonzero(r_fold != f) if f >= 0 else np.arange(len(R))
            if not len(rs):
                continue
            s, i = block_topk(Q if len(qs) == len(Q) else Q[qs], R if len(rs) == len(R) else R[rs], k, backend)
            i = np.where(i >= 0, pos[rs][np.maximum(i, 0)], -1)
            s = np.where(i >= 0, s, -np.inf).astype(np.float32)
            bs, bi = best_s[qs], best_i[qs]
            merge_topk(bs, bi, s, i)
            best_s[qs], best_i[qs] = bs, bi
    return best_s, best_i


def nearest_others(Q: np.ndarray, q_pos: np.ndarray, blocks, k: int, backend: str) -> np.ndarray:
    """Similarities [queries, k] of each query's ``k`` nearest reference rows other than itself, best first.

    ``q_pos``: the position of each query among the reference positions that ``blocks`` yields (a
    query that is also a reference row is not its own neighbour).  Missing neighbours: -inf.
    """
    sim, nbr = search(Q, np.full(len(Q), -1, np.int64), blocks, k + 1, backend)
    others = nbr != np.asarray(q_pos)[:, None]
    first = np.argsort(~others, axis=1, kind="stable")[:, :k]  # the others, in their order
    return np.take_along_axis(np.where(others, sim, -np.inf), first, 1)


# ---------------------------------------------------------------------------- approximate (faiss IVF)

# Rows from which an all-pairs search (the audit's near duplicates) uses an approximate IVF index when faiss is
# installed: exact search is quadratic (198 s at 50,000 rows, ~22 h at 1,000,000 on 2 cores; BENCHMARKS.md).
APPROX_ABOVE = 200_000
# Cells probed per query; recall of pairs above the near-duplicate threshold vs exact search: ACCURACY.md.
IVF_NPROBE = 8


def ivf_cells(n: int) -> int:
    """Cells of an IVF index for ``n`` rows: about 4 sqrt(n) (a query scans ~nprobe * sqrt(n) / 4 rows)."""
    return int(min(65536, max(16, round(4 * np.sqrt(n)))))


def ivf_index(sample: np.ndarray, n: int, *, nprobe: int = IVF_NPROBE):
    """An empty faiss IVF inner-product index (flat cells) for ``n`` normalised rows, cells trained on ``sample``.

    ``sample``: normalised rows spread over the data (at least ~40 per cell); add the rows with
    ``index.add`` and search with ``range_search`` or ``search``.  Approximate: a row is only
    compared with the rows of the ``nprobe`` cells nearest to it.
    """
    import faiss

    d = int(sample.shape[1])
    cells = min(ivf_cells(n), max(1, len(sample) // 39))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, cells, faiss.METRIC_INNER_PRODUCT)
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = min(nprobe, cells)
    return index
