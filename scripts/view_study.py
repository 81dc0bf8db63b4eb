"""View study: which feature views of one frozen backbone beat today's pooled features?

Two steps, so that the (slow, CPU) embedding pass runs once and the (cheap) head fits can be
rerun at will:

    python scripts/view_study.py embed ../shared/data/flowers12 --out runs/view_study/flowers12.npz
    python scripts/view_study.py study runs/view_study/flowers12.npz --json runs/view_study/flowers12.json

``embed`` decodes every image once (featx's CPU engine: Pillow + DataLoader, the backbone's own
preprocessing) and runs the network twice per batch, on the image and on its mirror, keeping
avg/max pooled outputs of the last timm stages (``forward_intermediates``) and avg/max/GeM of the
final feature map.  ``study`` builds the candidate views from those arrays and scores the
CV-chosen logistic regression (C by stratified 5-fold CV on the training rows only) on the
evaluation split, plus 5-shot accuracy (mean of 5 seeds) for the CV-chosen view vs the final
pooled features.  Results land in ACCURACY.md by hand.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featx.base.io import write_json  # noqa: E402
from featx.data.folders import discover  # noqa: E402
from featx.data.splits import train_eval_split  # noqa: E402
from featx.embedding.backbones import create_backbone  # noqa: E402
from featx.embedding.engines.cpu import iter_cpu_batches  # noqa: E402
from featx.runs.fewshot import fewshot  # noqa: E402

log = logging.getLogger("view_study")

GEM_P = 3.0
STAGES = (3, 4)  # timm feature_info stages of tf_efficientnet_lite0: blocks.4 (112 ch, /16), blocks.6 (320 ch, /32)
NORMS = ("standardise", "none", "l2", "power")  # "standardise" first: today's pipeline wins CV ties
C_GRID = [float(c) for c in np.logspace(-5, 3, 17)]  # today's logreg grid (featx.heads.tuning.grids)


def _pool(t, prefix: str, out: dict, *, gem: bool) -> None:
    import torch  # heavy: only for the embedding step

    out.setdefault(f"{prefix}_avg", []).append(t.mean(dim=(2, 3)).numpy())
    out.setdefault(f"{prefix}_max", []).append(t.amax(dim=(2, 3)).numpy())
    if gem:
        g = t.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
        out.setdefault(f"{prefix}_gem", []).append(g.numpy())
    del torch


def embed(root: str, out_path: str, *, backbone: str = "efficientnet_lite0", batch_size: int = 32) -> dict:
    """One decode pass; the network on each batch and on its mirror; pooled arrays saved as .npz."""
    import torch  # heavy: only for the embedding step

    ds = discover(root)
    bb = create_backbone(backbone)
    model = bb.model.eval().to(memory_format=torch.channels_last)
    arrays: dict[str, list] = {}
    t0 = time.perf_counter()
    seconds = {"plain": 0.0, "flip": 0.0}
    n = 0
    for idx, x, errs, _, _ in iter_cpu_batches(ds.samples, bb, batch_size=batch_size, num_workers=1, pin=False):
        bad = [e for e in errs if e]
        if bad:
            log.warning("%d images failed to load: %s", len(bad), bad[:3])
        for tag, xx in (("plain", x), ("flip", x.flip(-1))):
            t1 = time.perf_counter()
            with torch.inference_mode():
                xx = xx.contiguous(memory_format=torch.channels_last)
                final, inter = model.forward_intermediates(xx, indices=list(STAGES))
                pooled = model.forward_head(final)
            seconds[tag] += time.perf_counter() - t1
            arrays.setdefault(f"{tag}__today", []).append(pooled.float().numpy())
            for s, t in zip(STAGES, inter):
                _pool(t.float(), f"{tag}__stage{s}", arrays, gem=False)
            _pool(final.float(), f"{tag}__head", arrays, gem=True)
        n += len(idx)
        log.info("%d/%d images, %.0f s", n, len(ds.samples), time.perf_counter() - t0)
    out = {k: np.concatenate(v).astype(np.float32) for k, v in arrays.items()}
    out["labels"] = np.array([s.label for s in ds.samples])
    out["splits"] = np.array([s.split for s in ds.samples])
    out["classes"] = np.array(ds.classes)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    np.savez(out_path, **out)
    info = {"images": n, "wall_s": time.perf_counter() - t0, "network_s": seconds, "backbone": backbone}
    log.info("embedded %s", info)
    return info



def _l2(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def build_views(z: dict, *, flip: bool) -> dict[str, np.ndarray]:
    """Candidate views (all rows).  ``flip``: every pooled array averaged over the image and its mirror."""
    def get(name: str) -> np.ndarray:
        a = z[f"plain__{name}"]
        return (a + z[f"flip__{name}"]) / 2 if flip else a

    return {
        "final": get("today"),  # today's cache: avg-pooled final feature map (1280)
        "gem": get("head_gem"),  # GeM p=3 on the final feature map (1280)
        "avg+max": np.hstack([_l2(get("head_avg")), _l2(get("head_max"))]),  # 2560
        "multi2": np.hstack([_l2(get("stage4_avg")), _l2(get("head_avg"))]),  # 320 + 1280
        "multi3": np.hstack([_l2(get("stage3_avg")), _l2(get("stage4_avg")), _l2(get("head_avg"))]),  # 112+320+1280
    }


def normalise(X: np.ndarray, norm: str) -> np.ndarray:
    """Row-wise normalisations (stateless, so applying them before the CV split leaks nothing)."""
    if norm in ("none", "standardise"):
        return X
    if norm == "l2":
        return _l2(X)
    if norm == "power":
        return _l2(np.sign(X) * np.sqrt(np.abs(X)))
    raise ValueError(norm)


def _fit_path(X, y, Xv, norm: str, Cs: list[float]) -> list[np.ndarray]:
    """Predictions on ``Xv`` for each C (ascending, warm-started lbfgs); standardisation fitted on X only."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if norm == "standardise":
        sc = StandardScaler().fit(X)
        X, Xv = sc.transform(X), sc.transform(Xv)
    clf = LogisticRegression(max_iter=2000, warm_start=True)
    out = []
    for C in Cs:
        clf.set_params(C=C).fit(X, y)
        out.append(clf.predict(Xv))
    return out


def cv_logreg(Xtr, ytr, Xte, yte, norm: str, *, folds: int = 5, seed: int = 0, Cs=C_GRID) -> dict:
    """C by stratified k-fold CV on the training rows only, then refit and score the test rows once."""
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    Xtr, Xte = normalise(Xtr, norm), normalise(Xte, norm)
    t0 = time.perf_counter()
    with threadpool_limits(limits=1):
        scores = np.zeros(len(Cs))
        for a, b in StratifiedKFold(folds, shuffle=True, random_state=seed).split(Xtr, ytr):
            for i, pred in enumerate(_fit_path(Xtr[a], ytr[a], Xtr[b], norm, Cs)):
                scores[i] += np.mean(pred == ytr[b]) / folds
        best = int(np.argmax(scores))  # ties -> the smallest C (strongest regularisation)
        test_pred = _fit_path(Xtr, ytr, Xte, norm, Cs[: best + 1])[-1]
    return {"cv": float(scores[best]), "C": float(Cs[best]), "test": float(np.mean(test_pred == yte)),
            "dim": int(Xtr.shape[1]), "seconds": time.perf_counter() - t0}


def study(npz: str, *, shots: int = 5, seeds: int = 5) -> dict:
    """Every view x normalisation x TTA scored by CV on the training rows (and, for the record, on
    the test rows); the CV-best is "chosen".  Then ``shots``-shot accuracy (mean of ``seeds``) per view."""
    z = dict(np.load(npz))
    labels, splits = z["labels"], z["splits"]
    tr, ev, desc = train_eval_split(labels, splits)
    ytr, yte = labels[tr], labels[ev]
    np.testing.assert_allclose(z["plain__today"], z["plain__head_avg"], rtol=1e-4, atol=1e-5)
    rows: list[dict] = []

    def run(view: str, norm: str, flip: bool) -> dict:
        X = build_views(z, flip=flip)[view]
        r = dict(view=view, norm=norm, tta="flip" if flip else "none", **cv_logreg(X[tr], ytr, X[ev], yte, norm))
        rows.append(r)
        log.info("%s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        return r

    for flip in (False, True):
        for view in build_views(z, flip=False):
            for norm in NORMS:
                run(view, norm, flip)
    chosen = max(rows, key=lambda r: r["cv"])
    few = _few(z, tr, ev, shots=shots, seeds=seeds)
    return {"npz": npz, "split": desc, "n_train": int(len(tr)), "n_test": int(len(ev)), "rows": rows,
            "chosen_by_cv": chosen, "baseline": rows[0], "fewshot": few, "C_grid": C_GRID}


def _few(z, tr, ev, *, shots: int, seeds: int) -> dict:
    """``shots``-shot logreg per view (featx.heads.estimators.fewshot, C by CV in each draw), two heads:
    "today" = the probe's StandardScaler + LR; "cv-scale" = fewshot's default (standardise or L2 by CV)."""
    labels = z["labels"]
    out = {}
    heads = {"today": {"logreg": {"scale": ["standard"]}}, "cv-scale": None}
    for flip in (False, True):
        for view, X in build_views(z, flip=flip).items():
            for head, grids in heads.items():
                res = fewshot({"X_train": X[tr], "y_train": labels[tr], "X_eval": X[ev], "y_eval": labels[ev]},
                              shots=(shots,), seeds=seeds, heads=("logreg",), plot=False, grids=grids,
                              out_dir=Path("runs/view_study/fewshot_tmp"))
                cell = res.heads["logreg"][str(shots)]
                key = f"{view}/{head}/{'flip' if flip else 'none'}"
                out[key] = {"mean": cell["mean"], "ci95": cell["ci95"], "per_seed": cell["per_seed"],
                            "params": cell["params"]}
                log.info("%d-shot %s: %.4f", shots, key, cell["mean"])
    return out


def few_only(npz: str, *, shots: int = 5, seeds: int = 5) -> dict:
    z = dict(np.load(npz))
    tr, ev, desc = train_eval_split(z["labels"], z["splits"])
    return {"npz": npz, "split": desc, "shots": shots, "seeds": seeds, "fewshot": _few(z, tr, ev, shots=shots, seeds=seeds)}


def markdown(study_json: str, few_json: str | None = None) -> str:
    """The tables of ACCURACY.md from the JSON files of ``study`` (and ``few``)."""
    d = json.loads(Path(study_json).read_text())
    base = d["baseline"]
    lines = [f"train {d['n_train']} / eval {d['n_test']} ({d['split'].get('eval_split')}); baseline = final/standardise/none "
             f"test {base['test'] * 100:.2f} %", "",
             "| view | norm | TTA | dim | CV acc (train rows) | C | test acc | Δ test vs today |", "|---|---|---|---|---|---|---|---|"]
    chosen = d["chosen_by_cv"]
    for r in d["rows"]:
        mark = " **← chosen by CV**" if (r["view"], r["norm"], r["tta"]) == (chosen["view"], chosen["norm"], chosen["tta"]) else ""
        lines.append(f"| {r['view']} | {r['norm']} | {r['tta']} | {r['dim']} | {r['cv'] * 100:.2f} | {r['C']:.3g} | "
                     f"{r['test'] * 100:.2f} | {(r['test'] - base['test']) * 100:+.2f}{mark} |")
    for path in [p for p in (few_json,) if p] or [study_json]:
        few = json.loads(Path(path).read_text())["fewshot"]
        ref = next(v for k, v in few.items() if k.startswith("final/") and k.endswith("/none"))
        lines += ["", "| 5-shot view / head / TTA | mean of seeds | 95% CI | per seed | Δ vs final (today's logreg) |",
                  "|---|---|---|---|---|"]
        for k, v in few.items():
            ci = "–" if v["ci95"][0] is None else f"{v['ci95'][0] * 100:.1f}–{v['ci95'][1] * 100:.1f}"
            seeds = " ".join(f"{a * 100:.1f}" for a in v["per_seed"])
            lines.append(f"| {k} | {v['mean'] * 100:.2f} | {ci} | {seeds} | {(v['mean'] - ref['mean']) * 100:+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed", help="embed a dataset once into an .npz of pooled arrays (plain + mirror)")
    e.add_argument("root")
    e.add_argument("--out", required=True)
    e.add_argument("--batch-size", type=int, default=32)
    st = sub.add_parser("study", help="score every view with the CV-chosen logreg; write JSON")
    st.add_argument("npz")
    st.add_argument("--json", required=True)
    st.add_argument("--seeds", type=int, default=5)
    fw = sub.add_parser("few", help="only the few-shot comparison of the views; write JSON")
    fw.add_argument("npz")
    fw.add_argument("--json", required=True)
    fw.add_argument("--seeds", type=int, default=5)
    md = sub.add_parser("table", help="print the markdown tables of ACCURACY.md from the JSON files")
    md.add_argument("study_json")
    md.add_argument("--few-json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "embed":
        info = embed(args.root, args.out, batch_size=args.batch_size)
        print(json.dumps(info, indent=2))
    elif args.cmd == "table":
        print(markdown(args.study_json, args.few_json))
    elif args.cmd == "few":
        res = few_only(args.npz, seeds=args.seeds)
        write_json(args.json, res)
        for k, v in res["fewshot"].items():
            print(f"5-shot {k:30s} {v['mean']:.4f}  CI {v['ci95']}")
    else:
        res = study(args.npz, seeds=args.seeds)
        write_json(args.json, res)
        for r in res["rows"]:
            print(f"{r['view']:8s} {r['norm']:11s} {r['tta']:5s} dim {r['dim']:5d}  CV {r['cv']:.4f}  C {r['C']:.0e}  "
                  f"test {r['test']:.4f}  ({r['seconds']:.0f} s)")
        print("chosen by CV:", res["chosen_by_cv"]["view"], res["chosen_by_cv"]["norm"], res["chosen_by_cv"]["tta"])
        for k, v in res["fewshot"].items():
            print(f"5-shot {k:30s} {v['mean']:.4f}  CI {v['ci95']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
