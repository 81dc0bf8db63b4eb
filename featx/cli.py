"""The ``featx`` command line: parse options, make one library call, print the result.

Only this module prints; every library error (:class:`featx.FeatxError`) is shown as one line
with its fix (exit 2).  Options are not written here: each command's options are the fields of
its dataclass in :mod:`featx.config.settings` (type, default, help), which also define the
``--config FILE`` schema, ``configs/default.yaml`` and ``featx config``; ARCHITECTURE.md ("Where
new code goes") says how to add an option or a command.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click

from .base.errors import CacheWriteError, FeatxError
from .base.runtime import STOPPING, Terminated, on_sigterm
from .base.text import EscapingFormatter, escape_controls, escaped_stdout
from .base.version import __version__
from .config import (
    SETTINGS,
    CompareSettings,
    EmbedSettings,
    ExportSettings,
    FewshotSettings,
    InfoSettings,
    PredictSettings,
    ProbeSettings,
    ReportSettings,
    default_values,
    explain,
    format_entries,
    merge,
    nest,
    read_config,
    render_yaml,
)
from .config.early import CheckedCommand
from .config.options import command_line_values, settings_options
from .config.settings import AuditSettings, ExportModelSettings, VerifySettings

log = logging.getLogger("featx")
_ENTRY_POINT = False  # True when running as the `featx` program (not inside a test's CliRunner)


# --------------------------------------------------------------------------- helpers


def _setup_logging(verbose: int, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("featx").setLevel(level)


def _print_cache_summary(summary: dict, stats: dict | None = None) -> None:
    from .report.cache_summary import cache_summary_lines

    for line in cache_summary_lines(summary, stats):
        click.echo(line)


# --------------------------------------------------------------------------- group


class _Group(click.Group):
    command_class = CheckedCommand  # missing paths and impossible sizes refused before torch loads

    def invoke(self, ctx: click.Context):
        try:
            with escaped_stdout():  # names from files never reach the terminal raw
                return super().invoke(ctx)
        except FeatxError as exc:
            if STOPPING:  # raised while the run unwinds after a SIGTERM: the stop is what happened
                _stopped(ctx, Terminated())
            click.secho(f"error: {escape_controls(str(exc))}", fg="red", err=True)
            if isinstance(exc, CacheWriteError) and _ENTRY_POINT:
                # After a failed write HDF5 keeps the broken file open and can crash while shutting
                # down; everything worth keeping is already committed, so leave at once.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(2)
            ctx.exit(2)
        except (Exception, KeyboardInterrupt) as exc:
            if not (STOPPING or isinstance(exc, KeyboardInterrupt)):
                raise
            _stopped(ctx, exc if isinstance(exc, KeyboardInterrupt) else Terminated())  # any error while stopping


def _stopped(ctx: click.Context, exc: KeyboardInterrupt) -> None:
    what = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
    click.secho(f"{what}: finished work is saved; rerun the same command to resume where it stopped.",
                fg="yellow", err=True)
    ctx.exit(143 if isinstance(exc, Terminated) else 130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featx")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML file overriding the built-in defaults (same sections and keys as `featx config --yaml`).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """featx: embed an image folder with a frozen CNN, train scikit-learn heads on the cache,
    and compare with end-to-end fine-tuning."""
    quiet = "--quiet" in sys.argv[1:] or "-q" in sys.argv[1:]
    _setup_logging(verbose, quiet)
    try:
        file_cfg = read_config(config_path) if config_path is not None else {}
    except FeatxError as exc:
        click.secho(f"error: {escape_controls(str(exc))}", fg="red", err=True)
        ctx.exit(2)
    # Values from the file become click's defaults (the dataclass defaults are the options' own).
    ctx.default_map = {sec: values for sec, values in file_cfg.items() if sec in SETTINGS}
    cfg = merge(default_values(), file_cfg)
    ctx.obj = {"config": cfg, "config_path": config_path}


def _section(name: str = "heads") -> dict | None:
    """The merged ``name:`` section of --config (built-in defaults, e.g. the heads' grids, overridden by the file)."""
    return (click.get_current_context().obj or {}).get("config", {}).get(name)


# --------------------------------------------------------------------------- config


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--yaml", "as_yaml", is_flag=True, help="Print the values as a commented config file to copy and edit.")
@click.option("--json", "as_json", is_flag=True, help="Print values and sources as JSON.")
@click.argument("command", required=False, type=click.Choice(list(SETTINGS)))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def config(ctx: click.Context, as_yaml: bool, as_json: bool, command: str | None, args: tuple[str, ...]) -> None:
    """Show the effective settings of COMMAND (default: all) and where each value comes from:
    the built-in default, the --config file, or the command line (ARGS, as you would give them
    to COMMAND).  Options of `featx config` itself go before COMMAND.

    \b
    featx config                                   every section, built-in defaults
    featx --config my.yaml config probe            probe (and heads): default or file
    featx --config my.yaml config probe --head knn ... and what the command line changes
    featx config --yaml > my.yaml                  a complete config file to edit
    """
    cli_values: dict = {}
    sections = None
    if command is not None:
        sub = cli.commands.get(command)
        if sub is None and args:
            raise click.UsageError(f"{command!r} is a config section, not a command: it takes no options")
        if sub is not None:
            cli_values = command_line_values(sub, list(args), ctx.parent)
        sections = [command, *SETTINGS[command].also]
    path = ctx.obj.get("config_path")
    entries = explain(path, sections, cli_values)
    if as_json:
        rows = [{"key": e.name, "value": e.value, "source": e.source} for e in entries]
        click.echo(json.dumps({"config_file": path, "settings": rows}, indent=2))
    elif as_yaml:
        plain = path is None and not cli_values
        header = None if plain else (
            f"# featx settings: built-in defaults, overridden by {path or 'no file'} and the command line "
            "(rendered by `featx config --yaml`)\n"
        )
        click.echo(render_yaml(nest(entries), **({} if plain else {"header": header})), nl=False)
    else:
        click.echo(format_entries(entries, path))


# --------------------------------------------------------------------------- embed


def _print_shard(res, *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
        return
    st = res.stats
    click.echo(f"shard {res.shard}: embedded {st.embedded}, failed {st.failed_new} of its {res.assigned} images "
               f"({res.pending} were pending over all shards) into {res.parts} in {st.seconds:.1f}s")
    click.echo(f"when every shard has finished, run the same command without --shard to assemble {res.cache}")


@cli.command()
@click.argument("data", type=click.Path(), nargs=-1)
@settings_options(EmbedSettings)
def embed(data: tuple[str, ...], s: EmbedSettings) -> None:
    """Embed the images under DATA (DATA/<split>/<class>/* or DATA/<class>/*) into a cache.

    DATA may also be several Parquet/Arrow tables or WebDataset shard patterns (globs, {a,b} and {000..009}
    braces, table folders), all into one cache."""
    from .embedding.multi import embed_backbones  # torch: not imported for --help

    if not data and s.manifest is None:
        raise click.UsageError("give a dataset folder DATA, or --manifest FILE.csv")
    data = (data[0] if len(data) == 1 else list(data)) if data else None
    # strict is checked below, after the failures are listed.
    results, cache_set = embed_backbones(data, settings=s, strict=False, progress=not s.quiet)
    for fc in results:
        _print_embedded(fc, s)
    if cache_set is not None:
        click.echo(f"cache set {cache_set.path} ({cache_set.backbone}): featx probe {cache_set.path}")


def _print_embedded(fc, s: EmbedSettings) -> None:
    if s.shard is not None:  # a ShardResult: chunks added, no finished cache
        _print_shard(fc, as_json=s.as_json)
        return
    summary = fc.summary()
    stats = fc.stats.to_dict()
    if s.as_json:
        click.echo(json.dumps({"cache": summary, "run": stats}, indent=2))
    else:
        _print_cache_summary(summary, stats)
        for key, reason in fc.failed[:20]:
            click.echo(f"  failed: {key}: {reason}")
        if len(fc.failed) > 20:
            click.echo(f"  ... and {len(fc.failed) - 20} more (featx info --failed {fc.path})")
    if s.strict and fc.failed:
        raise FeatxError(f"--strict: {len(fc.failed)} image(s) failed to load (listed above); the cache was still written")


# --------------------------------------------------------------------------- info


@cli.command()
@click.argument("cache", type=click.Path(), required=False)
@settings_options(InfoSettings)
def info(cache: str | None, s: InfoSettings) -> None:
    """Summarise CACHE or a cache set (.multi.json; default: the newest in --cache-dir)."""
    from .cache.multi import open_cache  # h5py: not imported for --help

    fc = open_cache(cache, cache_dir=s.cache_dir)
    summary = fc.summary()
    if s.as_json:
        summary["failed_images"] = [{"path": k, "reason": r} for k, r in fc.failed]
        click.echo(json.dumps(summary, indent=2))
        return
    _print_cache_summary(summary)
    failed = fc.failed
    for key, reason in failed if s.show_failed else failed[:20]:
        click.echo(f"  failed: {key}: {reason}")
    if not s.show_failed and len(failed) > 20:
        click.echo(f"  ... and {len(failed) - 20} more (--failed lists all)")


# --------------------------------------------------------------------------- verify


@cli.command()
@click.argument("cache", type=click.Path(), required=False)
@settings_options(VerifySettings)
def verify(cache: str | None, s: VerifySettings) -> None:
    """Check CACHE (default: the newest in --cache-dir) in full: structure, every checksum, NaN/inf rows."""
    from .cache.store import find_cache  # h5py: not imported for --help
    from .cache.trust.verify import verify_cache

    res = verify_cache(find_cache(cache, cache_dir=s.cache_dir))
    if s.as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
    else:
        states = {"verified": "verified", "absent": "not verified: written before featx stored checksums",
                  "partial": "verified where present (some datasets have none)"}
        click.echo(f"cache      {res.path}\nrows       {res.rows}\nstructure  self-contained, shapes consistent")
        click.echo(f"checksums  {states[res.checksums]} ({', '.join(res.datasets)})")
        click.echo(f"non-finite {res.non_finite_rows} rows" + (f": {', '.join(res.non_finite_examples)}"
                                                                 if res.non_finite_examples else ""))
    if not res.ok:
        where = "; ".join(f"{k} rows {v}" for k, v in res.damaged.items())
        raise FeatxError(f"cache {res.path!r} is damaged ({where} do not match their checksums); rerun "
                         "`featx embed DATA` to embed those rows again, or delete it and rebuild it")


# --------------------------------------------------------------------------- compare


@cli.command()
@click.argument("data", type=click.Path(), required=False)
@settings_options(CompareSettings)
def compare(data: str | None, s: CompareSettings) -> None:
    """Compare the probe heads on DATA's cache (and, with --finetune, end-to-end fine-tuning)."""
    from .runs.compare import compare as run_compare  # torch: not imported for --help

    result = run_compare(data, settings=s, grids=_section(), progress=not s.quiet)
    if s.as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    split = result["split"]
    click.echo(
        f"\n{result['cache']['backbone']} on {result['cache']['root']}: {split['n_train']} train / "
        f"{split['n_eval']} eval images ({split.get('eval_split')})\n"
    )
    click.echo(result["table"])
    click.echo(f"\nbest: {result['best']}")
    for name in ("markdown", "json", "chart", "report"):
        if result["paths"].get(name):
            click.echo(f"{name:<9}{result['paths'][name]}")


# --------------------------------------------------------------------------- probe


@cli.command()
@click.argument("cache", type=click.Path(), required=False)
@settings_options(ProbeSettings)
def probe(cache: str | None, s: ProbeSettings) -> None:
    """Train scikit-learn heads (tuned by CV) on CACHE (default: newest in --cache-dir) and report them."""
    from .runs.audit_probe import probe_audited  # scikit-learn: not imported for --help
    from .runs.probe import probe as run_probe

    if s.audit or s.drop_flagged:
        result = probe_audited(cache, s, grids=_section(), audit_settings=AuditSettings(**(_section("audit") or {})))
    else:
        result = run_probe(cache, settings=s, grids=_section())
    if s.as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    if result["cv"].get("note"):
        click.echo(f"note: {result['cv']['note']}")
    click.echo(result["table"])
    click.echo(f"\nmetrics  {result['metrics_path']}")
    if result.get("report_path"):
        click.echo(f"report   {result['report_path']}")
    for name, h in result["heads"].items():
        click.echo(f"{name:<8} {h['confusion_png'] or ''}  {h['model_path'] or ''}".rstrip())
    if result.get("drop_flagged"):
        d = result["drop_flagged"]
        click.echo(f"\n--drop-flagged {','.join(d['kinds'])}: {d['dropped_train_rows']} training and "
                   f"{d['dropped_eval_rows']} evaluation rows left out ({d['note']})\n{d['table']}")
    if result.get("audit"):
        click.echo(f"\naudit    {result['audit']['summary']}")


# --------------------------------------------------------------------------- audit


@cli.command()
@click.argument("cache", type=click.Path(), required=False)
@settings_options(AuditSettings)
def audit(cache: str | None, s: AuditSettings) -> None:
    """Audit CACHE (default: newest in --cache-dir): label errors, duplicates (train/test leakage first), outliers."""
    from .runs.audit import audit as run_audit  # scikit-learn, cleanlab, torch: not imported for --help

    result = run_audit(cache, s, grids=_section())
    if s.as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    for name, path in result.files.items():
        click.echo(f"{name:<13}{path}")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(result.summary)


# --------------------------------------------------------------------------- predict


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@settings_options(PredictSettings)
def predict(inputs: tuple[str, ...], s: PredictSettings) -> None:
    """Classify INPUTS (image files, folders, or a featx .h5 cache) with a saved head; write a CSV."""
    from .runs.predict import predict as run_predict  # torch: not imported for --help

    result = run_predict(s.head_path, list(inputs), **s.library_kwargs(), progress=not s.quiet)
    if s.as_json:
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


# --------------------------------------------------------------------------- fewshot


def _shots(text: str) -> list[int]:
    try:
        shots = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        shots = []
    if not shots or min(shots) < 1:
        raise click.BadParameter(f"{text!r}: expected a comma list of positive integers, e.g. 1,5,10", param_hint="--shots")
    return shots


@cli.command()
@click.argument("cache", type=click.Path(), required=False)
@settings_options(FewshotSettings)
def fewshot(cache: str | None, s: FewshotSettings) -> None:
    """Few-shot curve on CACHE: k training images per class, several seeds, scored on the full evaluation split."""
    from .runs.fewshot import fewshot as run_fewshot  # scikit-learn: not imported for --help

    result = run_fewshot(cache, settings=s, shots=_shots(s.shots))
    data = result.to_dict()
    if s.as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(result.table())
    for note in data.get("notes") or []:
        click.echo(f"note: {note}")
    click.echo(f"\njson     {result.json_path}")
    if result.png_path:
        click.echo(f"curve    {result.png_path}")


# --------------------------------------------------------------------------- report, export


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False), required=False)
@settings_options(ReportSettings)
def report(run_dir: str | None, s: ReportSettings) -> None:
    """Write RUN_DIR/report.html (default: the newest run under --runs-dir): one offline page to read."""
    from .runs.publish import publish_existing_run  # matplotlib, scikit-learn: not imported for --help

    published = publish_existing_run(run_dir, **s.library_kwargs(), mlflow=s.mlflow)
    click.echo(f"report   {published['report']}")
    if run_dir is None:
        click.echo(f"run      {published['run']} (the newest probe or compare run; pass RUN_DIR for another)")
    if published.get("mlflow"):
        click.echo(f"mlflow   {published['mlflow']['tracking_uri']} run {published['mlflow']['run_id']}")


@cli.command()
@click.argument("cache", type=click.Path(), required=False)
@settings_options(ExportSettings)
def export(cache: str | None, s: ExportSettings) -> None:
    """Export CACHE (default: newest in --cache-dir) as Parquet, .npy or CSV, one row per image."""
    from .cache.export import export_cache  # h5py, pyarrow: not imported for --help
    from .cache.store import find_cache

    info = export_cache(find_cache(cache, cache_dir=s.cache_dir), **s.library_kwargs())
    if s.as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"exported {info['rows']} rows x {info['dim']} features ({info['format']}) to {info['out']}")
    for extra in info.get("files") or []:
        if str(extra) != str(info["out"]):
            click.echo(f"  also   {extra}")



@cli.command("export-model")
@settings_options(ExportModelSettings)
def export_model(s: ExportModelSettings) -> None:
    """Write --out (one ONNX graph: uint8 images -> probabilities, label) and preprocess.py, checked against predict."""
    from .runs.export_model import export_model as run_export  # torch, onnx: not imported for --help

    res = run_export(s.head_path, settings=s)
    if s.as_json:
        click.echo(json.dumps(res.to_dict(), indent=2, default=str))
        return
    click.echo(f"model    {res.model} ({res.size_mb:.1f} MB, input uint8 {res.input_shape}, {len(res.classes)} classes)")
    click.echo(f"prepare  {res.preprocess} (numpy + Pillow: resize and centre crop)")
    if res.verified_images:
        rt = "onnxruntime" + (" and OpenVINO" if res.fmt == "openvino" else "")
        click.echo(f"checked  {res.verified_images} images in {rt}: top-1 identical to featx predict, "
                   f"max |dp| {res.max_abs_diff:.1e}")
    if res.int8:
        q = res.int8
        click.echo(f"int8     accuracy {100 * q['float_accuracy']:.1f}% -> {100 * q['int8_accuracy']:.1f}% "
                   f"({q['change_pts']:+.1f} pts, paired on {q['images']} evaluation images; "
                   f"{q['float_only_right']} lost, {q['int8_only_right']} gained, McNemar p {q['mcnemar_p']:.2f})")


def main(argv: list[str] | None = None) -> None:
    global _ENTRY_POINT
    _ENTRY_POINT = True
    import signal

    signal.signal(signal.SIGTERM, on_sigterm)
    cli.main(args=argv, prog_name="featx")


if __name__ == "__main__":  # pragma: no cover
    main()
