"""Embedding throughput: the plain PyTorch loop vs ``featx.embed``, same data, same run.

Generates a set of photographic-looking JPEGs (smooth gradients, shapes, sensor noise;
500x375, quality 90 by default), then times, each in a fresh subprocess:

- ``plain``: torchvision ``ImageFolder`` + PIL transforms + ``DataLoader(batch_size=32)`` +
  fp32 forward (the loop everyone writes), features saved with ``np.save``;
- ``plain-tuned`` (CUDA only): the same loop with one worker per core, batch 256, bf16,
  channels_last, pinned memory;
- ``featx``: ``featx.embed`` end to end to a finished HDF5 cache (default engine: GPU decode
  on CUDA, the tuned CPU path otherwise), same backbone and batch size as ``plain``. On the CPU
  once per network runtime (``--runtimes``, default ``torch,auto``: torch is what a default
  install runs, auto runs OpenVINO fp32 when ``featx[openvino]`` is installed), plus one
  ``cold`` run whose OpenVINO conversion is not yet on disk (what the very first run pays);
- ``network only`` (per runtime: featx's network, default views, input dtype and batches in
  flight, on synthetic input) and ``decode only`` (featx's CPU loader with its default workers,
  no network; and the GPU engine's decoder run on the CPU): the halves alone, to show which
  one limits;
- peak RSS of ``featx.embed`` on N and 10N images (``ru_maxrss`` of a subprocess each).

Prints a table (method, backbone, images, seconds, images/s, ratio to ``plain``, load average
at the start of the run, machine). ``--repeat K`` runs every method K times, interleaved, and
reports the median (each run's figure is listed too): use it on a shared machine.

    python benchmarks/embed_bench.py --cpu-quick          # minutes on a 2-core laptop
    python benchmarks/embed_bench.py --cpu-quick --dataset ../shared/data/flowers12 --repeat 3
    python benchmarks/embed_bench.py                      # full size, for a GPU machine

``--dataset DIR`` times an existing ``split/class/image`` folder (all its images, every split)
instead of generated JPEGs.

Backbones other than efficientnet_lite0 use random weights (``--weights random``): the
timing is the same as with trained weights, and they need no download.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, peak_rss_mb, print_table, save_json  # noqa: E402

N_CLASSES = 10


# --------------------------------------------------------------------------- data


def _photo(seed: int, w: int, h: int, quality: int, path: str) -> None:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    # Smooth background: a colour gradient plus low-frequency variation.
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ang = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = ((xx / w) * np.cos(ang) + (yy / h) * np.sin(ang) + 1) / 2
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    low = rng.normal(0, 30, (6, 8, 3)).astype(np.float32)
    low_img = Image.fromarray(np.clip(low + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    img = img + (np.asarray(low_img, np.float32) - 128)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * (w, h)
        sw, sh = rng.uniform(0.05, 0.5, 2) * (w, h)
        col = tuple(int(v) for v in rng.uniform(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + sw, y0 + sh], fill=col)
        else:
            pts = [(x0 + rng.uniform(0, sw), y0 + rng.uniform(0, sh)) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=col)
    pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    arr = np.asarray(pil, np.float32) + rng.normal(0, 4, (h, w, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=quality)


def _photo_args(a):
    _photo(*a)


def generate(root: Path, n: int, *, size=(500, 375), quality: int = 90) -> Path:
    """``root/train/class_XX/img_XXXXXX.jpg`` (n images over 10 classes); kept between runs."""
    from multiprocessing import Pool

    jobs = []
    for i in range(n):
        d = root / "train" / f"class_{i % N_CLASSES:02d}"
        p = d / f"img_{i:06d}.jpg"
        if not p.exists():
            d.mkdir(parents=True, exist_ok=True)
            jobs.append((i, size[0], size[1], quality, str(p)))
    if jobs:
        t = time.perf_counter()
        with Pool(os.cpu_count() or 1) as pool:
            pool.map(_photo_args, jobs, chunksize=32)
        print(f"generated {len(jobs)} JPEGs in {root} ({time.perf_counter() - t:.0f}s)", flush=True)
    return root


def _selection(root: Path, n: int) -> list[str]:
    """The files featx.embed(limit=n) embeds, so every method sees the same images."""
    from featx.data import discover
    from featx.embedding.runner import _limit_per_split

    samples = discover(root).samples
    return [s.path for s in (_limit_per_split(samples, n) if n > 0 else samples)]


def _warm_page_cache(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 20):
                pass


# --------------------------------------------------------------------------- one measurement (subprocess)


def run_plain(args) -> dict:
    import numpy as np
    import torch
    from torch.utils.data import ConcatDataset, DataLoader, Subset
    from torchvision import datasets
    from torchvision import transforms as T

    from featx.embedding.backbones import create_backbone

    tuned = args.method == "plain-tuned"
    dev = args.device
    t0 = time.perf_counter()
    bb = create_backbone(args.backbone, weights=args.weights)
    pre = bb.preprocess
    interp = T.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    tf = T.Compose([T.Resize(pre.resize, interpolation=interp), T.CenterCrop(pre.crop), T.ToTensor(),
                    T.Normalize(pre.mean, pre.std)])
    parts = [datasets.ImageFolder(str(Path(args.data) / sp), transform=tf)
             for sp in ("train", "val", "test") if (Path(args.data) / sp).is_dir()]
    want = {os.path.realpath(p) for p in _selection(Path(args.data), args.n)}
    ds = ConcatDataset([Subset(d, [i for i, (p, _) in enumerate(d.samples) if os.path.realpath(p) in want])
                        for d in parts])
    cuda = dev.startswith("cuda")
    if tuned:
        dl = DataLoader(ds, batch_size=256, num_workers=os.cpu_count() or 1, pin_memory=cuda)
    else:
        dl = DataLoader(ds, batch_size=args.batch_size)
    model = bb.model.to(dev).eval()
    if tuned:
        model = model.to(memory_format=torch.channels_last)
    feats = []
    with torch.inference_mode():
        for x, _ in dl:
            x = x.to(dev, non_blocking=True)
            if tuned:
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
                    y = model(x)
            else:
                y = model(x)
            feats.append(y.float().cpu().numpy())
    out = Path(args.work) / f"{args.method}.npy"
    np.save(out, np.concatenate(feats))
    el = time.perf_counter() - t0
    return {"images": len(ds), "seconds": el, "peak_rss_mb": peak_rss_mb()}


def _runtime_kwargs(args, fn) -> dict:
    """``runtime=`` for featx calls: passed through where the function takes it, else applied by
    wrapping the CPU engine's forward_fn (featx versions whose embed() has no runtime option)."""
    import functools
    import inspect

    params = inspect.signature(fn).parameters
    # embed(..., settings=EmbedSettings, **overrides) takes every option of `featx embed` (runtime included)
    takes = "runtime" in params or "settings" in params
    if args.runtime == "default" or takes:
        return {} if args.runtime == "default" else {"runtime": args.runtime}
    from featx.embedding import runner
    from featx.embedding.engines import cpu

    runner.forward_fn = functools.partial(cpu.forward_fn, runtime=args.runtime)
    return {}


def run_featx(args) -> dict:
    from featx.embedding.runner import embed

    t0 = time.perf_counter()
    extra = _runtime_kwargs(args, embed)
    if args.workers is not None:
        extra["num_workers"] = args.workers
    fc = embed(
        args.data, backbone=args.backbone, weights=args.weights, cache_dir=str(Path(args.work) / "cache"),
        batch_size=args.batch_size, device=args.device, overwrite=True, progress=False,
        limit=args.n if args.n > 0 else None, engine=args.engine, **extra,
    )
    el = time.perf_counter() - t0
    return {"images": len(fc) + len(fc.failed), "seconds": el, "peak_rss_mb": peak_rss_mb(),
            "embed_images_per_s": fc.stats.images_per_s, "engine": fc.meta.get("engine", ""),
            "runtime": fc.meta.get("runtime", "")}


def _embed_views() -> dict:
    """The feature parts `featx embed` stores by default (its network outputs them all)."""
    try:
        from featx.config import defaults

        return {"views": defaults("embed").views}
    except (ImportError, AttributeError):  # featx versions without views
        return {}


def run_network(args) -> dict:
    """The network alone on synthetic input, as featx runs it (CPU: its thread layout, forward
    function, default views and input dtype — uint8 for OpenVINO, which normalises inside the
    network — with its batches in flight; CUDA: bf16 + channels_last at batch 256)."""
    import torch

    from featx.embedding.backbones import create_backbone
    from featx.embedding.engines.cpu import forward_fn as _forward_fn

    dev = args.device
    cuda = dev.startswith("cuda")
    bb = create_backbone(args.backbone, weights="random" if args.backbone != "efficientnet_lite0" else None,
                         **({} if cuda else _embed_views()))
    if dev == "cpu":
        ncpu = os.cpu_count() or 1
        torch.set_num_threads(int(os.environ.get("FEATX_CPU_THREADS") or 0) or ncpu)
    bs = 256 if cuda else args.batch_size
    f = _forward_fn(bb, dev, **({} if args.runtime == "default" else {"runtime": args.runtime}))
    crop = bb.preprocess.crop
    u8 = str(getattr(f, "runtime", "")).startswith("openvino") and hasattr(f, "run_many")
    x = torch.randint(0, 256, (bs, 3, crop, crop), dtype=torch.uint8) if u8 else torch.randn(bs, 3, crop, crop)
    if cuda:
        x = x.pin_memory()
    for _ in range(2):
        f(x)
    n = 0
    t0 = time.perf_counter()

    def batches():
        while time.perf_counter() - t0 < args.seconds:
            yield None, x

    for _, _y in (f.run_many(batches()) if hasattr(f, "run_many") else ((None, f(x)) for _ in batches())):
        n += bs  # features come back as numpy: includes the copy back, as in embed
    return {"images": n, "seconds": time.perf_counter() - t0, "runtime": getattr(f, "runtime", "torch")}


def run_loader(args) -> dict:
    """featx's CPU decode path alone: its DataLoader (default workers), files to the network's
    input batches (uint8 where the runtime normalises inside the network), no network."""
    from featx.base.runtime import default_workers
    from featx.data import discover
    from featx.embedding.backbones import create_backbone
    from featx.embedding.engines.cpu import iter_cpu_batches

    bb = create_backbone(args.backbone, weights="random" if args.backbone != "efficientnet_lite0" else None)
    want = set(_selection(Path(args.data), args.n))
    samples = [s for s in discover(args.data).samples if s.path in want]
    workers = args.workers if args.workers is not None else default_workers()
    kw = {"uint8": True} if "uint8" in iter_cpu_batches.__code__.co_varnames else {}
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds or n == 0:
        for idx, _x, *_ in iter_cpu_batches(samples, bb, batch_size=args.batch_size, num_workers=workers, pin=False, **kw):
            n += len(idx)
    return {"images": n, "seconds": time.perf_counter() - t0}


def run_decode(args) -> dict:
    """JPEG decode + resize/crop/normalise alone, as the featx GPU engine does it (on --device)."""
    import torch

    from featx.embedding.backbones import create_backbone
    from featx.embedding.engines.gpu import _BytesDataset, _Preparer

    bb = create_backbone(args.backbone, weights="random" if args.backbone != "efficientnet_lite0" else None)
    paths = _selection(Path(args.data), min(args.n, 4096))

    class S:
        def __init__(self, p):
            self.path = p

    ds = _BytesDataset([S(p) for p in paths], bb.preprocess)
    items = [ds[i] for i in range(len(ds))]  # file reading is not part of this figure
    prep = _Preparer(bb, args.device)
    bs = 256 if args.device.startswith("cuda") else args.batch_size
    prep(items[:bs])
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        while time.perf_counter() - t0 < args.seconds:
            for s in range(0, len(items), bs):
                prep(items[s : s + bs])
                n += len(items[s : s + bs])
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
    return {"images": n, "seconds": time.perf_counter() - t0}


def run_rss(args) -> dict:
    from featx.embedding.runner import embed

    fc = embed(args.data, backbone=args.backbone, weights=args.weights, cache_dir=str(Path(args.work) / f"rss{args.n}"),
               batch_size=args.batch_size, device=args.device, overwrite=True, progress=False, limit=args.n,
               **_runtime_kwargs(args, embed))
    return {"images": len(fc), "peak_rss_mb": peak_rss_mb()}


RUNNERS = {"plain": run_plain, "plain-tuned": run_plain, "featx": run_featx, "network": run_network,
           "decode": run_decode, "loader": run_loader, "rss": run_rss}


def _sub(method: str, args, *, env=None, **over) -> dict:
    cmd = [sys.executable, __file__, "--_run", method, "--data", str(args.data), "--work", str(args.work),
           "--device", args.device, "--batch-size", str(over.get("batch_size", args.batch_size)),
           "--n", str(over.get("n", args.n)), "--backbone", over["backbone"],
           "--seconds", str(over.get("seconds", args.seconds)), "--engine", args.engine,
           "--runtime", over.get("runtime", "default")]
    if over.get("weights"):
        cmd += ["--weights", over["weights"]]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "FEATX_OPENVINO_CACHE": str(Path(args.work) / "ov-cache"), **(env or {})}
    load = os.getloadavg()[0]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{method} failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["load"] = load
    return out


# --------------------------------------------------------------------------- main


def _plan(args) -> list[tuple[str, str, dict]]:
    """(label, method, options) of the end-to-end runs, in the order they run."""
    cuda = args.device.startswith("cuda")
    plan = [("plain", "plain", {})] + ([("plain-tuned", "plain-tuned", {})] if cuda else [])
    rts = ["default"] if cuda else [r for r in args.runtimes.split(",") if r]
    for rt in rts:
        plan.append((f"featx ({rt})" if rt != "default" else "featx", "featx", {"runtime": rt}))
    if not cuda and args.cold and any(r in ("auto", "openvino") for r in rts):
        plan.append(("featx (openvino, cold: converts)", "featx", {"runtime": "openvino", "cold": True}))
    return plan


def _timed_rows(args, bbn: str, n: int, mach: str) -> list[dict]:
    """End-to-end methods, ``--repeat`` times interleaved, then the halves; medians as rows."""
    import statistics

    weights = None if bbn == "efficientnet_lite0" else "random"
    plan = _plan(args)
    if not args.device.startswith("cuda"):  # untimed: "warm" runs find the converted and compiled network on disk
        for rt in dict.fromkeys(o.get("runtime", "default") for _, m, o in plan if m == "featx" and not o.get("cold")):
            if rt != "torch":
                _sub("featx", args, backbone=bbn, weights=weights, n=1, runtime=rt)  # one image per split
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in plan}
    for rep in range(args.repeat):
        for label, m, opt in plan:
            print(f"... {label} {bbn} (run {rep + 1}/{args.repeat})", flush=True)
            env = {"FEATX_OPENVINO_CACHE": tempfile.mkdtemp(prefix="ov-cold-", dir=args.work)} if opt.get("cold") else None
            runs[label].append(_sub(m, args, backbone=bbn, weights=weights, n=n, env=env,
                                    runtime=opt.get("runtime", "default")))
    halves = [(f"network only ({o['runtime']})" if o["runtime"] != "default" else "network only", "network", o)
              for _, m, o in plan if m == "featx" and not o.get("cold")]
    loader = [] if args.device.startswith("cuda") else [("decode only (featx CPU loader, no network)", "loader", {})]
    for label, m, opt in halves + loader + [("decode+resize only (GPU engine's decoder)", "decode", {})]:
        print(f"... {label} {bbn}", flush=True)
        runs[label] = [_sub(m, args, backbone=bbn, weights=weights, n=n, runtime=opt.get("runtime", "default"))]
    rows, base = [], None
    for label, rs in runs.items():
        ips = [r["images"] / r["seconds"] for r in rs]
        med = statistics.median(ips)
        base = base or med
        rows.append({"method": label, "backbone": bbn, "runtime": rs[0].get("runtime", ""), "images": rs[0]["images"],
                     "seconds": statistics.median(r["seconds"] for r in rs), "images/s": med, "ratio": med / base,
                     "runs (images/s)": " ".join(f"{v:.0f}" for v in ips),
                     "load": " ".join(f"{r['load']:.1f}" for r in rs),
                     "peak RSS MB": rs[0].get("peak_rss_mb", ""), "machine": mach})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-quick", action="store_true", help="small sizes for a 2-core CPU machine (minutes)")
    ap.add_argument("--data", default=None, help="folder for the generated JPEGs (kept; default: a temp folder)")
    ap.add_argument("--dataset", default=None, help="time this existing split/class image folder (all images) instead")
    ap.add_argument("--images", type=int, default=None, help="images timed per method (default 16000; quick: 400)")
    ap.add_argument("--size", default="500x375", help="JPEG size WxH")
    ap.add_argument("--backbones", default=None, help="comma list (default efficientnet_lite0,resnet50; quick or --dataset: efficientnet_lite0)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch size of plain and featx (the plain loop's 32)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--engine", default="auto", help="featx engine: auto, cpu or gpu")
    ap.add_argument("--runtimes", default="torch,auto", help="featx network runtimes timed on the CPU (comma list of torch, openvino, openvino-bf16, auto)")
    ap.add_argument("--no-cold", dest="cold", action="store_false", help="skip the OpenVINO run that converts the network first")
    ap.add_argument("--workers", type=int, default=None, help="featx decode workers (default: featx's own choice)")
    ap.add_argument("--repeat", type=int, default=1, help="run every end-to-end method this many times (median reported)")
    ap.add_argument("--rss", default=None, help="N,10N image counts for the peak-RSS check (default 2000,20000; quick 150,1500; 0 to skip)")
    ap.add_argument("--seconds", type=float, default=None, help="duration of the network-only/decode-only loops")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--backbone", default="efficientnet_lite0", help=argparse.SUPPRESS)
    ap.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--runtime", default="default", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._run:
        if args.seconds is None:
            args.seconds = 10.0
        args.method = args._run
        print(json.dumps(RUNNERS[args._run](args)))
        return
    _main(args)


def _main(args) -> None:
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.cpu_quick
    backbones = (args.backbones or ("efficientnet_lite0" if quick or args.dataset else "efficientnet_lite0,resnet50")).split(",")
    rss = [int(v) for v in (args.rss or ("150,1500" if quick else "2000,20000")).split(",")] if args.rss != "0" else []
    args.seconds = args.seconds if args.seconds is not None else (5.0 if quick else 10.0)
    w, h = (int(v) for v in args.size.lower().split("x"))
    tmp = None
    if args.dataset:
        args.data = Path(args.dataset).resolve()
        n = args.images or 0  # 0: every image of every split
        rss = []
        what = f"{len(_selection(args.data, n))} images of {args.data}"
    else:
        n = args.images or (400 if quick else 16000)
        if args.data is None:
            tmp = tempfile.TemporaryDirectory(prefix="featx-bench-")
            args.data = Path(tmp.name) / "jpegs"
        args.data = Path(args.data)
        generate(args.data, max([n] + rss), size=(w, h))
        what = f"{n} JPEGs of {w}x{h} in {args.data}"
    args.work = Path(tempfile.mkdtemp(prefix="featx-bench-work-"))
    _warm_page_cache(_selection(args.data, max([n] + rss) if n else 0))
    mach = machine()
    print(f"machine: {mach}\n{what}, batch size {args.batch_size}, device {args.device}, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)

    rows = []
    for bbn in backbones:
        rows += _timed_rows(args, bbn, n, mach)
    print()
    cols = ["method", "backbone", "runtime", "images", "seconds", "images/s", "ratio", "runs (images/s)", "load",
            "peak RSS MB"]
    table = print_table(rows, cols)
    print(f"\nmachine: {mach}; load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rss_rows = []
    if rss:
        for k in rss:
            print(f"... peak RSS of featx embed on {k} images", flush=True)
            r = _sub("rss", args, backbone=backbones[0], weights=None if backbones[0] == "efficientnet_lite0" else "random", n=k)
            rss_rows.append({"images": r["images"], "peak RSS MB": r["peak_rss_mb"]})
        print()
        print_table(rss_rows, ["images", "peak RSS MB"])
        if len(rss_rows) == 2:
            print(f"growth: {rss_rows[1]['peak RSS MB'] - rss_rows[0]['peak RSS MB']:+.0f} MB for {rss[1] // max(rss[0], 1)}x the images")
    save_json(args.json, {"machine": mach, "device": args.device, "images": n, "size": [w, h],
                          "batch_size": args.batch_size, "rows": rows, "rss": rss_rows, "table": table})


if __name__ == "__main__":
    main()
