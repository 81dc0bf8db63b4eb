"""The ``featx`` command line: parse options, make one library call, print the result.

Only this module prints. Defaults come from ``configs/default.yaml`` (``--config FILE`` to
override); every library error (:class:`featx.FeatxError`) is shown as one line with its fix.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .config import EXTRA_SECTIONS, load_config
from .base.errors import CacheWriteError, FeatxError

log = logging.getLogger("featx")
_ENTRY_POINT = False  # True when running as the `featx` program (not inside a test's CliRunner)


# --------------------------------------------------------------------------- helpers


def _validate_config(cfg: dict, group: click.Group, ctx: click.Context) -> dict:
    """Turn the config into click's default_map; unknown keys and wrong types are errors."""
    source = cfg.get("_source", {}).get("path", "configs/default.yaml")
    default_map: dict[str, dict] = {}
    for sec, values in cfg.items():
        if sec == "_source":
            continue
        if sec in EXTRA_SECTIONS:
            EXTRA_SECTIONS[sec](values, source)
            continue
        cmd = group.commands.get(sec)
        if cmd is None:
            known = sorted(set(group.commands) | set(EXTRA_SECTIONS))
            raise FeatxError(f"config {source}: unknown section {sec!r}; known sections: {', '.join(known)}")
        params = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
        converted = {}
        for key, val in values.items():
            if key not in params:
                raise FeatxError(
                    f"config {source}: unknown key {sec}.{key}; valid keys for {sec}: {', '.join(sorted(params))}"
                )
            p = params[key]
            if val is not None:
                try:
                    val = p.type_cast_value(ctx, val)
                except click.BadParameter as exc:
                    raise FeatxError(f"config {source}: {sec}.{key}: {exc.message}") from None
            converted[key] = val
        default_map[sec] = converted
    return default_map


def _setup_logging(verbose: int, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("featx").setLevel(level)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_cache_summary(summary: dict, stats: dict | None = None) -> None:
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    cls = summary["classes"]
    shown = ", ".join(cls[:10]) + (f", ... ({len(cls)} in all)" if len(cls) > 10 else "")
    click.echo(f"cache      {summary['path']}")
    click.echo(f"rows       {summary['rows']} ({splits})")
    click.echo(f"classes    {len(cls)}: {shown}")
    click.echo(f"features   {summary['dim']} x {summary['dtype']}")
    click.echo(f"backbone   {summary['backbone']}  (weights sha256 {str(summary['weights_sha256'])[:12]}, {summary['weights_source']})")
    click.echo(f"preprocess {summary['preprocess']}")
    click.echo(f"failed     {summary['failed']}")
    click.echo(f"size       {_human_bytes(summary['size_bytes'])}")
    click.echo(f"root       {summary['root']}")
    if stats:
        if stats.get("embedded") or stats.get("failed_new"):
            click.echo(
                f"this run   embedded {stats['embedded']}, reused {stats['reused']}, failed {stats['failed_new']} "
                f"in {stats['seconds']:.1f}s ({stats['images_per_s']:.1f} images/s on {stats['device']})"
            )
        else:
            click.echo(f"this run   nothing to embed: all {stats['reused']} images reused ({stats['seconds']:.1f}s)")


# --------------------------------------------------------------------------- group


class _Terminated(KeyboardInterrupt):
    """SIGTERM (kill, job schedulers) unwinds like Ctrl-C, so the user is told how to resume."""


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated()


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FeatxError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            if isinstance(exc, CacheWriteError) and _ENTRY_POINT:
                # After a failed write HDF5 keeps the broken file open and can crash while shutting
                # down; everything worth keeping is already committed, so leave at once.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            ctx.exit(2)
        except KeyboardInterrupt as exc:
            what = "terminated (SIGTERM)" if isinstance(exc, _Terminated) else "interrupted"
            click.secho(
                f"{what}: finished work is saved; rerun the same command to resume where it stopped.",
                fg="yellow", err=True,
            )
            ctx.exit(143 if isinstance(exc, _Terminated) else 130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featx")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML file overriding configs/default.yaml (same sections and keys).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """featx: embed an image folder with a frozen CNN, train scikit-learn heads on the cache,
    and compare with end-to-end fine-tuning."""
    quiet = "--quiet" in sys.argv[1:] or "-q" in sys.argv[1:]
    _setup_logging(verbose, quiet)
    from .heads import grids as _grids  # noqa: F401 - registers the free-form "heads:" section (no sklearn import)

    try:
        cfg = load_config(config_path)
        ctx.default_map = _validate_config(cfg, cli, ctx)
    except FeatxError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        ctx.exit(2)
    ctx.obj = {"config": cfg}


# --------------------------------------------------------------------------- embed


@cli.command()
@click.argument("data", type=click.Path(), required=False)
@click.option("--manifest", type=click.Path(dir_okay=False), help="CSV with columns path,label[,split] instead of a folder.")
@click.option("--backbone", "-b", default="efficientnet_lite0", show_default=True,
              help="Registered backbone, torchvision model name, or timm:<name>.")
@click.option("--weights", default=None, help="Local state-dict file, or 'random'. Default: pretrained weights.")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--cache", "cache_path", default=None, type=click.Path(dir_okay=False), help="Exact cache file path.")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--workers", default=None, type=int, help="DataLoader workers (default: one per core, at most 16).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]))
@click.option("--chunk-size", default=1024, show_default=True, type=int, help="Images per committed chunk.")
@click.option("--engine", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "gpu"]),
              help="gpu: decode JPEGs on the GPU (CUDA only).")
@click.option("--limit", default=None, type=int, help="At most this many images per split (quick runs).")
@click.option("--overwrite", is_flag=True, help="Discard an existing cache (or unfinished work) for these settings.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any image fails to load.")
@click.option("--no-wait", is_flag=True, help="Fail at once if another process is writing this cache.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines; only the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the cache summary as JSON.")
def embed(data, manifest, backbone, weights, cache_dir, cache_path, batch_size, workers, device, dtype,
          chunk_size, engine, limit, overwrite, strict, no_wait, quiet, as_json) -> None:
    """Embed the images under DATA (DATA/<split>/<class>/* or DATA/<class>/*) into a cache."""
    from .embedding.runner import embed as run_embed

    if data is None and manifest is None:
        raise click.UsageError("give a dataset folder DATA, or --manifest FILE.csv")
    fc = run_embed(
        data, manifest=manifest, backbone=backbone, weights=weights, cache_dir=cache_dir, cache=cache_path,
        batch_size=batch_size, num_workers=workers, device=device, dtype=dtype, chunk_size=chunk_size,
        engine=engine, limit=limit, overwrite=overwrite, strict=False, progress=not quiet, wait=not no_wait,
    )
    summary = fc.summary()
    stats = fc.stats.to_dict()
    if as_json:
        click.echo(json.dumps({"cache": summary, "run": stats}, indent=2))
    else:
        _print_cache_summary(summary, stats)
        for key, reason in fc.failed[:20]:
            click.echo(f"  failed: {key}: {reason}")
        if len(fc.failed) > 20:
            click.echo(f"  ... and {len(fc.failed) - 20} more (featx info --failed {fc.path})")
    if strict and fc.failed:
        raise FeatxError(f"--strict: {len(fc.failed)} image(s) failed to load (listed above); the cache was still written")


# --------------------------------------------------------------------------- info


@cli.command()
@click.argument("cache", type=click.Path(), required=False)
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--failed", "show_failed", is_flag=True, help="List every image that failed to load.")
@click.option("--json", "as_json", is_flag=True)
def info(cache, cache_dir, show_failed, as_json) -> None:
    """Summarise CACHE (default: the newest cache in --cache-dir)."""
    from .cache.store import FeatureCache, find_cache

    fc = FeatureCache(find_cache(cache, cache_dir=cache_dir))
    summary = fc.summary()
    if as_json:
        summary["failed_images"] = [{"path": k, "reason": r} for k, r in fc.failed]
        click.echo(json.dumps(summary, indent=2))
        return
    _print_cache_summary(summary)
    failed = fc.failed
    for key, reason in failed if show_failed else failed[:20]:
        click.echo(f"  failed: {key}: {reason}")
    if not show_failed and len(failed) > 20:
        click.echo(f"  ... and {len(failed) - 20} more (--failed lists all)")


# --------------------------------------------------------------------------- compare


@cli.command()
@click.argument("data", type=click.Path(), required=False)
@click.option("--cache", "cache_path", default=None, type=click.Path(dir_okay=False),
              help="Exact cache file (embedded from DATA if missing; used as is when DATA is omitted).")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False))
@click.option("--manifest", type=click.Path(dir_okay=False), help="CSV with columns path,label[,split] instead of a folder.")
@click.option("--backbone", "-b", default="efficientnet_lite0", show_default=True, help="Backbone of the cache.")
@click.option("--weights", default=None, help="Local state-dict file, or 'random'. Default: pretrained weights.")
@click.option("--limit", default=None, type=int, help="At most this many images per split (quick runs).")
@click.option("--head", default="all", show_default=True, help="Probe heads: all, or a comma list (logreg,svm,knn).")
@click.option("--kernel", default="linear", show_default=True, help="SVM kernel for the probe.")
@click.option("--folds", default=5, show_default=True, type=int, help="Cross-validation folds of the probe's search.")
@click.option("--test-size", default=0.2, show_default=True, type=float,
              help="Hold-out fraction when the data has no val/test split (shared by probe and fine-tune).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--finetune/--no-finetune", default=False, show_default=True,
              help="Also fine-tune the backbone end to end and compare.")
@click.option("--strategy", default="all", show_default=True,
              help="Fine-tune strategies: all, or a comma list of full, partial, head.")
@click.option("--epochs", default=10, show_default=True, type=int, help="Fine-tune epochs (early stopping may end sooner).")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Fine-tune batch size.")
@click.option("--lr", default=3e-3, show_default=True, type=float, help="Peak learning rate of the new linear layer.")
@click.option("--backbone-lr-scale", default=0.1, show_default=True, type=float,
              help="Backbone learning rate = --lr times this.")
@click.option("--weight-decay", default=0.05, show_default=True, type=float, help="AdamW weight decay.")
@click.option("--warmup-epochs", default=1.0, show_default=True, type=float,
              help="Linear warm-up (at most a fifth of all steps), then cosine decay.")
@click.option("--label-smoothing", default=0.1, show_default=True, type=float)
@click.option("--partial-blocks", default=2, show_default=True, type=int,
              help="Blocks trained by --strategy partial (counted from the end).")
@click.option("--val-fraction", default=0.1, show_default=True, type=float,
              help="Slice of the training rows used for early stopping (0: none).")
@click.option("--patience", default=3, show_default=True, type=int, help="Early-stopping patience in epochs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=None, type=int, help="Fine-tune DataLoader workers (default: per device).")
@click.option("--n-jobs", default=-1, show_default=True, type=int, help="CPU jobs for the probe's search.")
@click.option("--out-dir", default=None, type=click.Path(file_okay=False),
              help="Where the report and checkpoints go (default runs/compare-<cache name>).")
@click.option("--checkpoint-seconds", default=600.0, show_default=True, type=float,
              help="Also checkpoint within an epoch this often (0: only at epoch ends).")
@click.option("--overwrite", is_flag=True, help="Retrain fine-tunes instead of resuming or reusing finished ones.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or log lines; only the table.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
def compare(data, cache_path, cache_dir, manifest, backbone, weights, limit, head, kernel, folds, test_size, seed,
            finetune, strategy, epochs, batch_size, lr, backbone_lr_scale, weight_decay, warmup_epochs,
            label_smoothing, partial_blocks, val_fraction, patience, device, workers, n_jobs, out_dir,
            checkpoint_seconds, overwrite, quiet, as_json) -> None:
    """Compare the probe heads on DATA's cache (and, with --finetune, end-to-end fine-tuning)."""
    from .finetune.comparison import compare as run_compare

    cfg = (click.get_current_context().obj or {}).get("config") or {}
    result = run_compare(
        data, cache=cache_path, cache_dir=cache_dir, manifest=manifest, backbone=backbone, weights=weights,
        limit=limit, head=head, kernel=kernel, folds=folds, test_size=test_size, seed=seed, finetune=finetune,
        strategy=strategy, epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr_scale=backbone_lr_scale,
        weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
        partial_blocks=partial_blocks, val_fraction=val_fraction, patience=patience, device=device,
        num_workers=workers, n_jobs=n_jobs, grids=cfg.get("heads"), out_dir=out_dir,
        checkpoint_seconds=checkpoint_seconds,
        overwrite=overwrite, progress=not quiet,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    split = result["split"]
    click.echo(
        f"\n{result['cache']['backbone']} on {result['cache']['root']}: {split['n_train']} train / "
        f"{split['n_eval']} eval images ({split.get('eval_split')})\n"
    )
    click.echo(result["table"])
    click.echo(f"\nbest: {result['best']}")
    for name in ("markdown", "json", "chart"):
        click.echo(f"{name:<9}{result['paths'][name]}")


# --------------------------------------------------------------------------- probe


@cli.command()
@click.argument("cache", type=click.Path(), required=False)
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False),
              help="Where to look for the newest cache when CACHE is not given.")
@click.option("--head", default="svm", show_default=True, help="logreg, svm, knn, all, or a comma list.")
@click.option("--kernel", default="linear", show_default=True, type=click.Choice(["linear", "rbf"]),
              help="SVM kernel (rbf searches C and gamma).")
@click.option("--test-size", default=0.2, show_default=True, type=float,
              help="Hold-out fraction when the cache has no val/test split.")
@click.option("--folds", default=5, show_default=True, type=int, help="Cross-validation folds for the hyperparameter search.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda (GPU heads when available).")
@click.option("--n-jobs", default=-1, show_default=True, type=int, help="CPU jobs for the search (-1: all cores).")
@click.option("--out-dir", default=None, type=click.Path(file_okay=False),
              help="Where metrics.json, plots and heads go (default: runs/probe-<cache name>/).")
@click.option("--no-save", is_flag=True, help="Do not write the fitted heads.")
@click.option("--quiet", "-q", is_flag=True, help="No log lines; only the table.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
def probe(cache, cache_dir, head, kernel, test_size, folds, seed, device, n_jobs, out_dir, no_save, quiet,
          as_json) -> None:
    """Train scikit-learn heads (tuned by CV) on CACHE (default: newest in --cache-dir) and report them."""
    from .heads.probing import probe as run_probe

    cfg = (click.get_current_context().obj or {}).get("config") or {}
    result = run_probe(
        cache, head=head, kernel=kernel, test_size=test_size, folds=folds, seed=seed, device=device,
        n_jobs=n_jobs, out_dir=out_dir, grids=cfg.get("heads"), save=not no_save, cache_dir=cache_dir,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    if result["cv"].get("note"):
        click.echo(f"note: {result['cv']['note']}")
    click.echo(result["table"])
    click.echo(f"\nmetrics  {result['metrics_path']}")
    for name, h in result["heads"].items():
        click.echo(f"{name:<8} {h['confusion_png'] or ''}  {h['model_path'] or ''}".rstrip())


# --------------------------------------------------------------------------- predict


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--head", "head_path", required=True, type=click.Path(dir_okay=False),
              help="A .joblib head written by `featx probe` (its .json sidecar must be beside it).")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="CSV to write (default: runs/predict-<head>.csv).")
@click.option("--weights", default=None, help="Backbone weights file if the head's cannot be found here.")
@click.option("--cache-dir", default="cache", show_default=True, type=click.Path(file_okay=False),
              help="Image features are cached under <cache-dir>/predict/.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--workers", default=None, type=int, help="DataLoader workers (default: one per core, at most 16).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or log lines; only the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def predict(inputs, head_path, out, weights, cache_dir, device, batch_size, workers, quiet, as_json) -> None:
    """Classify INPUTS (image files, folders, or a featx .h5 cache) with a saved head; write a CSV."""
    from .embedding.predict import predict as run_predict

    result = run_predict(
        head_path, list(inputs), out=out, weights=weights, cache_dir=cache_dir, device=device,
        batch_size=batch_size, num_workers=workers, progress=not quiet,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    click.echo(f"predicted {result['n_images']} images with {result['head_name']} ({result['backbone']}) -> {result['csv']}")
    click.echo("counts   " + ", ".join(f"{k} {v}" for k, v in result["counts"].items()))
    if result["folder_accuracy"] is not None:
        click.echo(
            f"accuracy {result['folder_accuracy']:.4f} on the {result['n_with_folder_class']} images whose folder "
            "is named after a class"
        )
    for f in result["failed"][:20]:
        click.echo(f"  failed: {f['path']}: {f['reason']}")
    if result["n_failed"] > 20:
        click.echo(f"  ... and {result['n_failed'] - 20} more (see {result['csv'][:-4]}.json)")


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    global _ENTRY_POINT
    _ENTRY_POINT = True
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    cli.main(args=argv, prog_name="featx")


if __name__ == "__main__":  # pragma: no cover
    main()
