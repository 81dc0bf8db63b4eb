"""The lines `featx info` and `featx embed` print about a cache or a cache set.

Why here: the same summary is printed for a one-backbone cache and for a cache set (one cache
per backbone, named by a ``.multi.json`` file); the command line only prints these lines.
"""

from __future__ import annotations

from ..base.progress import format_bytes


def _backbone_lines(summary: dict) -> list[str]:
    members = summary.get("members")
    if not members:
        sha = str(summary["weights_sha256"])[:12]
        return [f"backbone   {summary['backbone']}  (weights sha256 {sha}, {summary['weights_source']})",
                f"preprocess {summary['preprocess']}"]
    lines = [f"backbones  {summary['backbone']}  (a cache set: one cache per backbone, rows aligned)"]
    for name, path in members.items():
        lines.append(f"  {name}: {path}")
        lines.append(f"    weights {summary['weights_source'].get(name)}; preprocess {summary['preprocess'].get(name)}")
    return lines


def _dims(summary: dict) -> str:
    dims = summary.get("dims")
    return " + ".join(f"{d} ({n})" for n, d in dims.items()) if dims else str(summary["dim"])


def cache_summary_lines(summary: dict, stats: dict | None = None) -> list[str]:
    """Human-readable lines for ``summary`` (``FeatureCache.summary()`` or ``MultiCache.summary()``)."""
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    cls = summary["classes"]
    shown = ", ".join(cls[:10]) + (f", ... ({len(cls)} in all)" if len(cls) > 10 else "")
    lines = [f"cache      {summary['path']}", f"rows       {summary['rows']} ({splits})",
             f"classes    {len(cls)}: {shown}", f"features   {_dims(summary)} x {summary['dtype']}"]
    if len(summary.get("views") or []) > 1:
        lines.append(f"views      {', '.join(summary['views'])}  (featx probe chooses by CV; --view NAME forces one)")
    if summary.get("train_views"):
        lines.append(f"augmented  {summary['train_views']} views per training image (featx probe --train-views auto|on|off)")
    lines += _backbone_lines(summary)
    lines += [f"failed     {summary['failed']}", f"size       {format_bytes(summary['size_bytes'])}",
              f"root       {summary['root']}"]
    if stats:
        if stats.get("embedded") or stats.get("failed_new"):
            lines.append(f"this run   embedded {stats['embedded']}, reused {stats['reused']}, failed {stats['failed_new']} "
                         f"in {stats['seconds']:.1f}s ({stats['images_per_s']:.1f} images/s on {stats['device']})")
        else:
            lines.append(f"this run   nothing to embed: all {stats['reused']} images reused ({stats['seconds']:.1f}s)")
    return lines
