"""Every option of every command, once: one frozen dataclass per command (and one for the heads' grids).

Each field carries its type, its default and its help text.  From these the command-line options
are generated (:mod:`featx.config.options`), YAML files are checked (:mod:`featx.config.loader`),
``configs/default.yaml`` is rendered (:mod:`featx.config.render`) and the library functions take
their defaults (``defaults("compare").epochs``).  Nothing here imports click, numpy or torch.

Field metadata (all optional, see :func:`option`):
  ``help``       the ``--help`` text, also the comment in the rendered YAML.
  ``flags``      the option's spellings; default ``--field-name`` (``("--json",)`` for ``as_json``).
  ``path``       ``"file"`` or ``"dir"``: the option is a path (click shows FILE / DIRECTORY).
  ``required``   the option must be given (``predict --head``).
  ``lib``        the library keyword it feeds (default: the field name; None: the CLI handles it).
  ``file``       rendered in ``configs/default.yaml`` and ``featx config`` (False for per-run paths
                 and terminal switches such as ``--json``; a config file may still set them).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

# The sets of choices: each option's Literal type below is derived from its tuple there.
from ..base import choices
from .fields import (  # noqa: F401 - option and flag: the public way to declare a field
    CACHE_DIR_HELP,
    LIMIT_HELP,
    MANIFEST_HELP,
    NEWEST_HELP,
    SAME,
    flag,
    option,
    probe_cv_repeats,
    probe_max_train_rows,
    probe_norm,
    probe_solver,
    probe_stream_epochs,
    probe_train_views,
    probe_view,
    shared_cache_dir,
    shared_device,
    shared_json,
    shared_quiet,
    shared_weights,
    shared_workers,
)

# Hyperparameter grids searched by CV.  A value is a list, or ``{"logspace": [start, stop, num]}``
# (powers of ten).  Grid keys: a head name, or "svm_rbf" for ``svm`` with ``kernel="rbf"``.
DEFAULT_GRIDS: dict[str, dict[str, Any]] = {
    # The best C on real CNN features is often 1e-3 or below: the grid is wide on purpose.
    "logreg": {"C": {"logspace": [-5, 3, 17]}},
    "svm": {"C": {"logspace": [-6, 2, 17]}},
    # Features are standardised then L2-normalised, so gamma ~ 1 is "one typical distance"
    # whatever the feature dimension.
    "svm_rbf": {"C": {"logspace": [-1, 3, 5]}, "gamma": {"logspace": [-2, 1, 7]}},
    "knn": {"n_neighbors": [1, 3, 5, 7, 9, 15, 21, 31], "weights": ["uniform", "distance"], "metric": ["cosine"]},
    # DINO-style kNN: cosine similarity, votes weighted by exp(sim / temperature).
    "knn_dino": {"n_neighbors": [10, 20], "temperature": [0.03, 0.07, 0.1]},
}
DEFAULT_SCALARS: dict[str, Any] = {"scoring": "accuracy", "max_iter": 2000}


class Settings:
    """Behaviour shared by the per-command dataclasses."""

    section: ClassVar[str] = ""
    also: ClassVar[tuple[str, ...]] = ()  # other sections the command reads (shown by `featx config COMMAND`)

    def to_dict(self) -> dict[str, Any]:
        """Every field (the settings saved beside a run's results)."""
        return dataclasses.asdict(self)

    def library_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the command's library call, named as the library names them."""
        out = {}
        for f in dataclasses.fields(self):
            lib = f.metadata.get("lib", SAME)
            if lib is not None:
                out[f.name if lib is SAME else lib] = getattr(self, f.name)
        return out

    @classmethod
    def lib_names(cls) -> dict[str, str]:
        """Library keyword -> field name, for the fields whose keyword differs (``num_workers`` -> ``workers``)."""
        out = {}
        for f in dataclasses.fields(cls):
            lib = f.metadata.get("lib", SAME)
            if lib is not SAME and lib is not None:
                out[lib] = f.name
        return out

    @classmethod
    def with_overrides(cls, settings: "Settings | None", overrides: dict[str, Any], *, call: str,
                       extras: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """The settings of a library call: ``settings`` (default: the command's defaults) with keyword overrides.

        An override names a field (``workers``) or the keyword the library has always taken for it
        (``num_workers``).  ``extras``: the call's library-only keywords and their defaults (``progress``...).
        Returns (settings, extras with the overrides applied).  An unknown keyword raises TypeError naming it
        and the valid ones, as a Python call would.
        """
        if settings is not None and not isinstance(settings, cls):
            raise TypeError(f"{call}(settings=...) takes a {cls.__name__}, got {type(settings).__name__}")
        extras = dict(extras or {})
        names = {f.name for f in dataclasses.fields(cls)}
        aliases = cls.lib_names()
        changes: dict[str, Any] = {}
        unknown = []
        for key, value in overrides.items():
            if key in extras:
                extras[key] = value
            elif key in names or key in aliases:
                changes[aliases.get(key, key)] = value
            else:
                unknown.append(key)
        if unknown:
            valid = sorted(names | set(aliases) | set(extras))
            raise TypeError(f"{call}() got unexpected keyword argument(s) {', '.join(sorted(unknown))}; "
                            f"valid: {', '.join(valid)}")
        return dataclasses.replace(settings if settings is not None else cls(), **changes), extras

    @classmethod
    def describe(cls) -> str:
        """First line of the class docstring (the section's comment in the YAML)."""
        return (cls.__doc__ or "").strip().splitlines()[0]


@dataclass(frozen=True)
class EmbedSettings(Settings):
    """`featx embed DATA`: embed an image folder with a frozen CNN into a crash-safe cache."""

    section: ClassVar[str] = "embed"
    manifest: Optional[str] = option(None, MANIFEST_HELP, path="file", file=False)
    backbone: str = option("efficientnet_lite0", "Registered backbone, torchvision model name, or timm:<name>.",
                           flags=("--backbone", "-b"))
    weights: Optional[str] = shared_weights()
    cache_dir: str = shared_cache_dir(CACHE_DIR_HELP)
    cache_path: Optional[str] = option(None, "Exact cache file path.", flags=("--cache",), path="file", lib="cache",
                                       file=False)
    batch_size: int = option(64, "Images per forward pass.")
    workers: Optional[int] = shared_workers()
    device: str = shared_device()
    dtype: Literal[choices.DTYPES] = option("float32", "Feature type in the cache (float16 halves its size).")
    chunk_size: int = option(1024, "Images per committed chunk.")
    engine: Literal[choices.ENGINES] = option("auto", "gpu: decode JPEGs on the GPU (CUDA only).")
    runtime: Literal[choices.RUNTIMES] = option(
        "auto", "Network runtime on the CPU: auto = OpenVINO fp32 when installed (pip install 'featx[openvino]'; "
                "same features, several times faster), else torch; openvino-bf16 is faster still but changes the "
                "features (its own cache).")
    views: str = option("final,stages", "Feature parts stored per image: final (always), stages (the two stages "
                        "before the final map: the probe's multi2/multi3 views, +34% cache size), gem (GeM pooling, "
                        "+100%). 'final' writes the plain cache of earlier versions.")
    tta: Literal[choices.TTAS] = option("none", "flip: also store every part averaged over the image and its "
                                          "mirror (+flip views; a second network pass).")
    train_views: Optional[int] = option(
        None, "Also store K augmented views (random-resized crop + flip, seeded) of each training image; the probe can "
              "train on them (CV grouped by image). K extra passes over the training split. Default: keep what the "
              "cache already stores (none for a new cache); 0 removes them.")
    limit: Optional[int] = option(None, LIMIT_HELP)
    overwrite: bool = flag("Discard an existing cache (or unfinished work) for these settings.")
    storage_option: tuple[str, ...] = option(
        (), "KEY=VALUE passed to fsspec for URL inputs (repeatable; VALUE may be JSON), e.g. anon=true or "
            "endpoint_url=http://127.0.0.1:9000. Credentials come from each store's own conventions (AWS_*).",
        lib="storage_options", file=False)
    read_concurrency: int = option(16, "Concurrent object reads per decode worker for URL, WebDataset and Parquet "
                                   "inputs.")
    allow_other_buckets: bool = flag("A manifest in a bucket may name objects in other buckets of its store (by "
                                     "default its rows stay in its own bucket; other schemes are never read).")
    max_image_bytes: int = option(32 << 20, "WebDataset/Parquet/URL input: the largest encoded image read, in "
                                  "bytes; a larger tar member, table cell or object is recorded as failed, never read.")
    image_column: str = option("image", "Parquet input: the column of encoded images (or {bytes, path} structs).")
    label_column: str = option("label", "Parquet input: the label column (class names, or ints).")
    split_column: Optional[str] = option(None, "Parquet input: a column of train/val/test (default: all --split).")
    split: Optional[Literal[choices.SPLITS]] = option(
        None, "WebDataset/Parquet input: the split of every sample (default: from a train/val/test part of the "
              "shard name, else train).", file=False)
    data_root: Optional[str] = option(
        None, "Parquet/Arrow input: the folder that image paths without bytes (datasets' to_parquet of image files) "
              "are relative to (default: the table's folder).", path="dir", file=False)
    class_names: Optional[str] = option(
        None, "WebDataset input: classes.txt (one name per line) or classes.json naming the cls numbers (default: "
              "such a file beside the shards).", path="file", file=False)
    executor: Literal[choices.EXECUTORS] = option(
        "local", "ray: embed on a Ray Data actor pool (one actor per GPU, else per CPU); needs featx[ray].")
    ray_address: Optional[str] = option(
        None, "Join this Ray cluster (HEAD_IP:6379, or auto); default: a private Ray on this machine.", file=False)
    num_actors: Optional[int] = option(None, "Ray actors (default: one per GPU, else one per CPU).")
    shard: Optional[str] = option(
        None, "I/N: embed only shard I of N (0 <= I < N) into the cache's .parts folder and write no cache; run "
              "once more without --shard to assemble.", file=False)
    strict: bool = flag("Exit non-zero if any image fails to load.", lib=None, file=True)
    no_wait: bool = flag("Fail at once if another process is writing this cache.", lib=None, file=True)
    quiet: bool = shared_quiet("No progress bar or log lines; only the summary.")
    as_json: bool = shared_json("Print the cache summary as JSON.")


@dataclass(frozen=True)
class InfoSettings(Settings):
    """`featx info [CACHE]`: summarise a cache."""

    section: ClassVar[str] = "info"
    cache_dir: str = shared_cache_dir(NEWEST_HELP)
    show_failed: bool = flag("List every image that failed to load.", flags=("--failed",), lib=None)
    as_json: bool = shared_json()


@dataclass(frozen=True)
class VerifySettings(Settings):
    """`featx verify [CACHE]`: read a whole cache against its checksums (and for NaN/inf)."""

    section: ClassVar[str] = "verify"
    cache_dir: str = shared_cache_dir(NEWEST_HELP)
    as_json: bool = shared_json()


@dataclass(frozen=True)
class ProbeSettings(Settings):
    """`featx probe [CACHE]`: scikit-learn heads on a cache, hyperparameters chosen by CV on the training rows."""

    section: ClassVar[str] = "probe"
    also: ClassVar[tuple[str, ...]] = ("heads",)
    cache_dir: str = shared_cache_dir(NEWEST_HELP)
    head: str = option("svm", "logreg, svm, knn, all, or a comma list.")
    kernel: Literal[choices.KERNELS] = option("linear", "SVM kernel (rbf searches C and gamma).")
    test_size: float = option(0.2, "Hold-out fraction when the cache has no val/test split.")
    folds: int = option(5, "Cross-validation folds for the hyperparameter search.")
    seed: int = option(0, "Seed of the hold-out split and the CV folds.")
    device: str = shared_device("auto, cpu or cuda (GPU heads when available).")
    n_jobs: int = option(-1, "CPU jobs for the search (-1: all cores).")
    out_dir: Optional[str] = option(None, "Where metrics.json, plots and heads go (default: runs/probe-<cache name>-<run key>/, the key naming the cache's identity and the settings that change results; the folder is replaced whole when the run completes).",
                                    path="dir", file=False)
    no_save: bool = flag("Do not write the fitted heads.", lib=None, file=True)
    view: str = probe_view()
    norm: str = probe_norm()
    train_views: Literal[choices.TRAIN_VIEWS] = probe_train_views()
    cv_repeats: int = probe_cv_repeats()
    max_train_rows: Optional[int] = probe_max_train_rows()
    solver: Literal[choices.SOLVERS] = probe_solver()
    stream_epochs: int = probe_stream_epochs()
    head_format: Literal[choices.HEAD_FORMATS] = option(
        "skops", "File format of saved heads: skops (safe to share) or joblib (a pickle: loading it can run code; "
                 "predict needs --trust).", flags=("--format",))
    # lib=None: the library writes no report unless asked (tests and scripts call probe() often).
    report: bool = option(True, "Write report.html (mistakes, confusion, embedding map) beside metrics.json.",
                          flags=("--report/--no-report",), lib=None)
    mlflow: bool = flag("Log settings, metrics, report and heads to MLflow (MLFLOW_TRACKING_URI, default ./mlruns).",
                        file=True)
    audit: bool = flag("Also audit the data (featx audit: label errors, duplicates, train/test leakage, outliers) "
                       "into the run folder and its report.", lib=None)
    drop_flagged: Optional[str] = option(
        None, "leakage, labels or leakage,labels: probe again without the flagged training rows (labels) and the "
              "leaked evaluation rows (leakage), and report both results side by side; no file is touched.",
        lib=None, file=False)
    quiet: bool = shared_quiet("No log lines; only the table.")
    as_json: bool = shared_json("Print the whole result as JSON.")


@dataclass(frozen=True)
class AuditSettings(Settings):
    """`featx audit [CACHE]`: label errors, duplicates (train/test leakage first) and outliers, from a cache."""

    section: ClassVar[str] = "audit"
    also: ClassVar[tuple[str, ...]] = ("heads",)
    cache_dir: str = shared_cache_dir(NEWEST_HELP)
    data_root: Optional[str] = option(
        None, "Folder whose image files are hashed for exact duplicates and shown as thumbnails (default: the root "
              "recorded in the cache); files outside it are skipped and counted.", path="dir", file=False)
    out_dir: Optional[str] = option(None, "Where the CSVs, audit.json and report.html go (default: "
                                    "runs/audit-<cache name>-<run key>/).", path="dir", file=False)
    view: str = option("auto", "Feature view of the audit; auto: labels on the probe's logreg choice (probe --audit: "
                       "its head's), neighbours on final.")
    test_size: float = option(0.2, "Hold-out fraction when the cache has no val/test split (as the probe's).")
    folds: int = option(5, "Cross-validation folds of the out-of-fold probabilities (the probe's folds).")
    seed: int = option(0, "Seed of the hold-out split and the CV folds (as the probe's).")
    near_threshold: float = option(0.94, "Cosine similarity of the final features from which two images are near "
                                   "duplicates (README: JPEG q80 / 90 % resized copies of photos mostly score above it; "
                                   "distinct photos of one class stay below it).")
    neighbours: int = option(5, "Nearest training images of the same class that the outlier score averages over.")
    outlier_z: float = option(4.0, "Robust z-score (median, MAD of the class's training rows) of the kNN distance "
                              "from which an image is an outlier.")
    max_pairs: int = option(10000, "Most duplicate pairs kept (the most similar).")
    block_rows: int = option(4096, "Rows per block of the neighbour search (memory: block_rows^2 floats).")
    backend: Literal[choices.SEARCH_BACKENDS] = option(
        "torch", "Neighbour search: exact, in blocks: torch matrix products, or faiss's flat index (pip install "
                 "'featx[faiss]').")
    report: bool = option(True, "Write report.html beside audit.json.", flags=("--report/--no-report",))
    quiet: bool = shared_quiet("No log lines; only the summary.")
    as_json: bool = shared_json("Print audit.json.")


@dataclass(frozen=True)
class CompareSettings(Settings):
    """`featx compare [DATA]`: probe heads vs end-to-end fine-tuning on the same splits."""

    section: ClassVar[str] = "compare"
    also: ClassVar[tuple[str, ...]] = ("heads",)
    cache_path: Optional[str] = option(
        None, "Exact cache file (embedded from DATA if missing; used as is when DATA is omitted).",
        flags=("--cache",), path="file", lib="cache", file=False)
    cache_dir: str = shared_cache_dir(CACHE_DIR_HELP)
    manifest: Optional[str] = option(None, MANIFEST_HELP, path="file", file=False)
    backbone: str = option("efficientnet_lite0", "Backbone of the cache.", flags=("--backbone", "-b"))
    weights: Optional[str] = shared_weights()
    limit: Optional[int] = option(None, LIMIT_HELP)
    head: str = option("all", "Probe heads: all, or a comma list (logreg,svm,knn).")
    kernel: Literal[choices.KERNELS] = option("linear", "SVM kernel for the probe.")
    folds: int = option(5, "Cross-validation folds of the probe's search.")
    test_size: float = option(
        0.2, "Hold-out fraction when the data has no val/test split (shared by probe and fine-tune).")
    seed: int = option(0, "Seed of the hold-out split, the CV folds and the fine-tunes.")
    view: str = probe_view()
    norm: str = probe_norm()
    train_views: Literal[choices.TRAIN_VIEWS] = probe_train_views()
    cv_repeats: int = probe_cv_repeats()
    max_train_rows: Optional[int] = probe_max_train_rows()
    solver: Literal[choices.SOLVERS] = probe_solver()
    stream_epochs: int = probe_stream_epochs()
    finetune: bool = option(False, "Also fine-tune the backbone end to end and compare.",
                            flags=("--finetune/--no-finetune",))
    strategy: str = option("all", "Fine-tune strategies: all, or a comma list of full, partial, head.")
    epochs: int = option(10, "Fine-tune epochs (early stopping is judged only after the LR has annealed to half "
                             "its peak).")
    batch_size: int = option(32, "Fine-tune batch size.")
    lr: float = option(3e-3, "Peak learning rate of the new linear layer.")
    backbone_lr_scale: float = option(0.1, "Backbone learning rate = --lr times this.")
    weight_decay: float = option(0.05, "AdamW weight decay.")
    warmup_epochs: float = option(1.0, "Linear warm-up (at most a fifth of all steps), then cosine decay.")
    label_smoothing: float = option(0.1, "Label smoothing of the fine-tune loss.")
    partial_blocks: int = option(2, "Blocks trained by --strategy partial (counted from the end).")
    val_fraction: float = option(0.1, "Slice of the training rows used for early stopping (0: none).")
    patience: int = option(3, "Early-stopping patience in epochs.")
    min_val_images: int = option(100, "Validation slices smaller than this do not early-stop: the fixed schedule "
                                      "runs to the end and keeps its last weights.")
    device: str = shared_device()
    workers: Optional[int] = shared_workers("Fine-tune DataLoader workers (default: per device).")
    n_jobs: int = option(-1, "CPU jobs for the probe's search.")
    out_dir: Optional[str] = option(None, "Where the report and checkpoints go (default runs/compare-<cache name>-<run key>).",
                                    path="dir", file=False)
    checkpoint_seconds: float = option(600.0, "Also checkpoint within an epoch this often (0: only at epoch ends).")
    overwrite: bool = flag("Retrain fine-tunes instead of resuming or reusing finished ones.")
    report: bool = option(True, "Write report.html beside compare.json.", flags=("--report/--no-report",), lib=None)
    mlflow: bool = flag("Log settings, metrics, report and heads to MLflow.", file=True, lib=None)
    quiet: bool = shared_quiet("No progress bars or log lines; only the table.")
    as_json: bool = shared_json("Print the whole result as JSON.")


@dataclass(frozen=True)
class PredictSettings(Settings):
    """`featx predict --head FILE INPUTS...`: apply a saved head to images; writes a CSV."""

    section: ClassVar[str] = "predict"
    head_path: Optional[str] = option(
        None, "A .skops head (or, with --trust, a .joblib head) written by `featx probe` (its .json sidecar must "
              "be beside it).",
        flags=("--head",), path="file", required=True, lib=None, file=False)
    out: Optional[str] = option(None, "CSV to write (default: runs/predict-<head>.csv).", path="file", file=False)
    weights: Optional[str] = option(None, "Backbone weights file if the head's cannot be found here.", file=False)
    cache_dir: str = shared_cache_dir("Image features are cached under <cache-dir>/predict/.")
    device: str = shared_device()
    batch_size: int = option(64, "Images per forward pass.")
    workers: Optional[int] = shared_workers()
    trust: bool = flag("Load a joblib/pickle head; pickles can run code when loaded, so only for heads from a source "
                       "you trust (.skops heads never need it).")
    quiet: bool = shared_quiet("No progress bar or log lines; only the summary.")
    as_json: bool = shared_json("Print the result as JSON.")


@dataclass(frozen=True)
class FewshotSettings(Settings):
    """`featx fewshot [CACHE]`: accuracy vs training images per class, k drawn per class and seed."""

    section: ClassVar[str] = "fewshot"
    cache_dir: str = shared_cache_dir(NEWEST_HELP)
    shots: str = option("1,2,5,10,20", "Training images per class, a comma list.", lib=None)
    seeds: int = option(5, "Draws per shot count.")
    head: str = option("logreg,knn", "Heads: logreg, knn, knn_dino (comma list).", lib="heads")
    view: str = option("final", "Feature view(s) of the cache: final, multi2, multi3, gem, <view>+flip; a comma list "
                       "draws one curve per head and view (head@view) on the same draws.")
    out_dir: Optional[str] = option(None, "Where fewshot.json and fewshot.png go (default: runs/fewshot-<cache name>-<run key>/).",
                                    path="dir", file=False)
    cap_shots: bool = option(False, "Take all images of classes with fewer than k instead of stopping.",
                             flags=("--cap-shots/--no-cap-shots",), lib="cap")
    test_size: float = option(0.2, "Hold-out fraction when the cache has no val/test split.")
    seed: int = option(0, "Seed of the hold-out split.", lib="split_seed")
    report: bool = option(True, "Write report.html beside fewshot.json.", flags=("--report/--no-report",), lib=None)
    mlflow: bool = flag("Log the curve and its settings to MLflow.", file=True, lib=None)
    quiet: bool = shared_quiet("No log lines; only the table.")
    as_json: bool = shared_json("Print the whole result as JSON.")


@dataclass(frozen=True)
class ReportSettings(Settings):
    """`featx report [RUN_DIR]`: one offline report.html for a probe, compare or fewshot run."""

    section: ClassVar[str] = "report"
    runs_dir: str = option("runs", "Where to look for the newest run when RUN_DIR is omitted.", path="dir")
    cache_path: Optional[str] = option(None, "The run's cache, if it moved since the run.", flags=("--cache",),
                                       path="file", lib="cache", file=False)
    mlflow: bool = flag("Also log the run to MLflow.", file=True, lib=None)


@dataclass(frozen=True)
class ExportSettings(Settings):
    """`featx export [CACHE] --out FILE`: one row per image (path, label, split, features) for other tools."""

    section: ClassVar[str] = "export"
    cache_dir: str = option("cache", NEWEST_HELP, path="dir", lib=None)
    fmt: Literal[choices.EXPORT_FORMATS] = option("parquet", "Output format.", flags=("--format",))
    out: Optional[str] = option(None, "File to write.", path="file", required=True, file=False)
    view: Optional[str] = option(None, "Feature view to export (default: the cache's features).", file=False)
    chunk_rows: int = option(8192, "Rows per block: memory stays constant whatever the cache size.")
    as_json: bool = shared_json("Print what was written as JSON (default: one summary line).")


@dataclass(frozen=True)
class ExportModelSettings(Settings):
    """`featx export-model --head FILE --out model.onnx`: one ONNX graph (network, view, head) + preprocess.py."""

    section: ClassVar[str] = "export_model"
    head_path: Optional[str] = option(
        None, "A .skops head (or, with --trust, a .joblib head) written by `featx probe`.",
        flags=("--head",), path="file", required=True, lib=None, file=False)
    out: Optional[str] = option(None, "The .onnx file to write (--format openvino: the .xml, its .bin beside it); "
                                "preprocess.py is written beside it.", path="file", required=True, file=False)
    fmt: Literal[choices.MODEL_FORMATS] = option(
        "onnx", "Model format: onnx, or openvino (OpenVINO IR converted from the checked ONNX graph, checked "
        "again in OpenVINO's runtime).", flags=("--format",))
    quantize: Literal[choices.QUANTIZE] = option(
        "none", "int8: NNCF post-training quantisation of the network (with --format openvino), calibrated on "
        "training images of the head's cache; refused if its accuracy on the evaluation images falls by more "
        "than --max-accuracy-drop.")
    calibration: int = option(300, "--quantize int8: training images of the head's cache it is calibrated on.")
    max_accuracy_drop: float = option(1.0, "--quantize int8: the most accuracy (points, paired on the evaluation "
                                      "images) the int8 model may lose against the float model.")
    max_model_mb: float = option(512.0, "Refuse to write a model bigger than this (a kNN head carries its rows).")
    verify: int = option(64, "Evaluation images of the head's cache run in onnxruntime and compared with `featx "
                         "predict` before the model is written (0: no check).")
    images: Optional[str] = option(None, "A folder of images to verify on instead of the cache's evaluation images.",
                                   path="dir", file=False)
    weights: Optional[str] = option(None, "Backbone weights file if the head's cannot be found here.", file=False)
    cache_dir: str = shared_cache_dir("`featx predict`'s features for the check are cached under <cache-dir>/predict/.")
    trust: bool = flag("Load a joblib/pickle head (pickles can run code; .skops heads never need it).")
    quiet: bool = shared_quiet("No progress bar or log lines; only the summary.")
    as_json: bool = shared_json("Print the result as JSON.")

def _grid(name: str) -> Any:
    return lambda: copy.deepcopy(DEFAULT_GRIDS[name])


_GRID_HELP = "a list of values, or {logspace: [start, stop, num]} (powers of ten)"


@dataclass(frozen=True)
class HeadsSettings(Settings):
    """Hyperparameter grids of the heads (used by probe and compare), searched by CV on the training rows."""

    section: ClassVar[str] = "heads"
    scoring: str = option(DEFAULT_SCALARS["scoring"],
                          "Any scikit-learn scorer name, e.g. balanced_accuracy for skewed classes.")
    max_iter: int = option(DEFAULT_SCALARS["max_iter"], "Solver iterations of logreg / linear SVM.")
    logreg: dict = option(help=f"Logistic regression: C, {_GRID_HELP}.", factory=_grid("logreg"))
    svm: dict = option(help=f"Linear SVM: C, {_GRID_HELP}.", factory=_grid("svm"))
    svm_rbf: dict = option(help="SVM with --kernel rbf: C and gamma (features are standardised and "
                                "L2-normalised first).", factory=_grid("svm_rbf"))
    knn: dict = option(help="kNN: n_neighbors, weights (uniform, distance), metric (e.g. cosine, euclidean).",
                       factory=_grid("knn"))
    knn_dino: dict = option(help="DINO-style kNN (--head knn_dino): n_neighbors, temperature (votes weighted by "
                                 "exp(cosine / temperature)).", factory=_grid("knn_dino"))

    def grids(self) -> dict[str, dict[str, Any]]:
        """The grids, keyed as in DEFAULT_GRIDS."""
        return {k: copy.deepcopy(getattr(self, k)) for k in DEFAULT_GRIDS}


# Section name -> dataclass.  A new command adds its dataclass here (and in featx/cli.py).
SETTINGS: dict[str, type[Settings]] = {
    cls.section: cls
    for cls in (EmbedSettings, InfoSettings, ProbeSettings, AuditSettings, CompareSettings, PredictSettings,
                FewshotSettings, ReportSettings, ExportSettings, ExportModelSettings, HeadsSettings, VerifySettings)
}


@functools.lru_cache(maxsize=None)
def field_types(cls: type[Settings]) -> dict[str, Any]:
    """Resolved type hints of the dataclass fields (``Optional[int]``, ``Literal[...]``...)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def defaults(section: str) -> Settings:
    """The built-in defaults of one section, e.g. ``defaults("compare").epochs`` (a fresh instance)."""
    try:
        return SETTINGS[section]()
    except KeyError:
        raise KeyError(f"no settings section {section!r}; known: {', '.join(SETTINGS)}") from None
