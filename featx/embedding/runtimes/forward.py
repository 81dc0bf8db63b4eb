"""Network runtimes for the frozen backbone: who runs ``model(x)`` during embedding.

- ``torch``: PyTorch on any device (channels_last, heap buffers kept on the CPU, bf16 autocast
  on CUDA) — what featx always did.
- ``openvino``: the same network converted once with ``openvino.convert_model`` and compiled
  for the CPU in **fp32** (``INFERENCE_PRECISION_HINT=f32``: on CPUs with AVX-512 BF16 or AMX
  OpenVINO would otherwise run in bf16 and change the features). Same features as torch fp32
  (cosine 1.0 to six decimals), 2-4x the images per second on small x86 CPUs, which is why
  ``auto`` picks it on the CPU whenever the ``openvino`` package is installed
  (``pip install 'featx[openvino]'``).
- ``openvino-bf16`` (opt-in): OpenVINO on the CPU in bf16 — ~2x fp32's speed on CPUs with
  AVX-512 BF16/AMX, but other features (min cosine ~0.9996 to fp32), so it is part of the cache
  fingerprint (:func:`runtime_fingerprint`): its caches never mix with fp32 ones.
- ``auto``: ``openvino`` on the CPU when importable and the backbone converts (checked against
  torch on a probe batch), else ``torch``; always ``torch`` on CUDA/MPS.

fp32 OpenVINO produces the same features as torch, so the runtime is *not* part of the cache
fingerprint; the runtime actually used is exposed as ``Forward.runtime`` for provenance.

Converting a network takes seconds (efficientnet_lite0: ~5 s on 2 idle cores, 12 s on a busy
machine) while reading it back takes ~0.3 s, so converted networks are kept per process and on
disk: ``$FEATX_OPENVINO_CACHE`` (``off`` disables it), else ``$XDG_CACHE_HOME/featx/openvino``
or ``~/.cache/featx/openvino``. The file name is a digest of the backbone's fingerprint and the
torch/OpenVINO versions, so changed weights or versions never reuse a stale network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ...base.choices import RUNTIMES  # noqa: F401 - re-exported
from ...base.errors import FeatxError
from ...base.runtime import keep_heap_buffers
from .ov_net import OpenVinoNet, with_uint8_input

log = logging.getLogger(__name__)

# Runtimes that change the features, and the fingerprint entry that keeps their caches apart.
_FEATURE_CHANGING = {"openvino-bf16": {"precision": "bf16-openvino"}}
INSTALL_HINT = "pip install 'featx[openvino]'"
# Streams (2 of 1 thread on 2 cores), each running a whole batch, with a request per stream in
# flight: measured 10-30 % faster than one LATENCY request with all threads (BENCHMARKS.md).
OPENVINO_HINT = "THROUGHPUT"
# A converted network must reproduce torch fp32 on a probe batch at least this well.
MIN_COSINE = 0.9999

_CONVERTED: dict[str, object] = {}  # digest -> openvino.Model, per process
_COMPILED: dict[tuple, object] = {}  # (digest, threads, hint, precision, input kind) -> openvino.CompiledModel
_CORE: list = []  # one openvino.Core per process
_FAILED: dict[str, str] = {}  # digest -> why conversion failed (not retried in this process)


def runtime_fingerprint(runtime: str) -> dict:
    """Cache-fingerprint entries of a runtime: empty for those with torch fp32's features."""
    return dict(_FEATURE_CHANGING.get((runtime or "auto").lower(), {}))


def openvino_available() -> bool:
    """Is the optional ``openvino`` package importable (without importing it)?"""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def resolve_runtime(runtime: str, device: str) -> str:
    """``auto``/``torch``/``openvino`` -> the runtime to try; an impossible explicit choice is an error."""
    r = (runtime or "auto").lower()
    if r not in RUNTIMES:
        raise FeatxError(f"--runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    cpu = device == "cpu"
    if r.startswith("openvino"):
        if not cpu:
            raise FeatxError(
                f"--runtime {r} runs on the CPU only, not on {device!r}; use --device cpu, "
                "or --runtime auto (torch on GPUs)"
            )
        if not openvino_available():
            raise FeatxError(
                f"--runtime {r} needs the openvino package: {INSTALL_HINT} (or use --runtime torch)"
            )
        return r
    if r == "auto":
        return "openvino" if cpu and openvino_available() else "torch"
    return r


class Forward:
    """``f(x)`` -> float32 numpy features ``[B, dim]`` for a batch tensor ``x`` (any batch size).

    ``runtime`` names the runtime that runs (or will run) the network: "torch" or "openvino".
    The network is built on the first call, not here: running a model in the parent process
    before the DataLoader forks its workers leaves OpenMP broken in them, and on the first call
    the workers already exist. Under ``auto`` a network that does not convert (or converts to
    different numbers) falls back to torch with a warning, and ``runtime`` then says "torch".
    """

    def __init__(self, backbone, device: str, *, runtime: str = "auto", model_cache=None) -> None:
        self.backbone = backbone
        self.device = device
        self.requested = (runtime or "auto").lower()
        self.runtime = resolve_runtime(runtime, device)
        self.model_cache = model_cache
        self._impl: Callable | None = None

    def __call__(self, x) -> np.ndarray:
        if self._impl is None:
            self._impl = self._build()
        return self._impl(x)

    def run_many(self, items: Iterable[tuple[object, object]]) -> Iterator[tuple[object, np.ndarray]]:
        """``(tag, batch)`` pairs in, ``(tag, features)`` out in the same order; OpenVINO keeps
        several batches in flight, torch runs them one by one.

        The network is built once the first batch is there (the DataLoader has forked its workers).
        """
        it = iter(items)
        first = next(it, None)
        if first is None:
            return
        if self._impl is None:
            self._impl = self._build()
        many = getattr(self._impl, "run_many", None)
        if many is not None:
            yield from many(itertools.chain([first], it))
            return
        for tag, x in itertools.chain([first], it):
            yield tag, self._impl(x) if len(x) else np.zeros((0, self.backbone.out_dim), np.float32)

    def _build(self) -> Callable:
        if self.runtime.startswith("openvino"):
            precision = "bf16" if self.runtime == "openvino-bf16" else "f32"
            try:
                return openvino_forward(self.backbone, model_cache=self.model_cache, precision=precision)
            except FeatxError as exc:
                if self.requested != "auto":
                    raise
                log.warning("%s; embedding with torch instead (same features, slower)", exc)
                self.runtime = "torch"
        return torch_forward(self.backbone, self.device)


def make_forward(backbone, device: str, *, runtime: str = "auto", model_cache=None) -> Forward:
    """The network of ``backbone`` on ``device`` as a :class:`Forward` (see the module docstring)."""
    return Forward(backbone, device, runtime=runtime, model_cache=model_cache)


def torch_forward(backbone, device: str) -> Callable:
    """PyTorch: channels_last everywhere, bf16 autocast on CUDA.

    On the CPU two things matter more than anything else on small machines: channels_last
    (oneDNN's fast convolution layout, ~1.4x for EfficientNet/ResNet) and keeping glibc from
    returning every large activation buffer to the OS after each layer (with its default
    32 MB mmap threshold, a batch of 64 at 224 px page-faults gigabytes per batch and the run
    spends more time in the kernel than in the network).
    """
    import torch  # heavy; featx imports it only where a network runs

    model = backbone.model.to(device).eval()
    cuda = device.startswith("cuda")
    if device == "cpu":
        keep_heap_buffers()
    # The channels_last copy of the weights is made on the first batch, after the DataLoader
    # has forked its workers: an OpenMP parallel region in the parent before fork() leaves
    # libgomp's state broken in the children and their first tensor op hangs.
    converted = []

    def f(x):
        if x.dtype == torch.uint8:  # decoded for OpenVINO, which normalises inside the network
            x = backbone.preprocess.normalize(x)
        if not converted:
            model.to(memory_format=torch.channels_last)
            converted.append(True)
        with torch.inference_mode():
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            if cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = model(x)
            else:
                y = model(x)
            return y.float().cpu().numpy()

    return f


def openvino_forward(backbone, *, model_cache=None, hint: str = OPENVINO_HINT, precision: str = "f32") -> OpenVinoNet:
    """OpenVINO on the CPU, any batch size; raises FeatxError if the network does not convert.

    ``precision`` "f32" (torch's features) or "bf16" (faster, other features: opt-in only).
    The result takes normalised float32 batches or uint8 ones (normalised inside the network)
    and runs a stream of batches with several requests in flight (:mod:`.ov_net`).
    """
    import torch  # heavy; only to read the thread count the caller chose

    keep_heap_buffers()
    digest = network_digest(backbone)
    threads = max(1, torch.get_num_threads())
    model = converted_model(backbone, model_cache=model_cache)  # converts (or raises) now, not per input kind

    def compiled(kind: str):
        key = (digest, threads, hint, precision, kind)
        if key not in _COMPILED:
            config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads}
            folder = model_cache_dir(model_cache)
            if folder is not None:  # compiled blobs, beside the converted networks: loading one is ~3x faster
                config["CACHE_DIR"] = str(folder.with_name(folder.name + "-compiled"))
            net = with_uint8_input(model, backbone.preprocess) if kind == "u8" else model
            _COMPILED[key] = _compile(net, config)
        return _COMPILED[key]

    return OpenVinoNet(compiled, backbone.out_dim)


def network_digest(backbone) -> str:
    """Names one converted network: backbone fingerprint, input size and library versions."""
    import openvino  # optional extra; callers checked it is importable
    import torch  # heavy; for its version only

    key = {
        "fingerprint": backbone.fingerprint(),
        "crop": backbone.preprocess.crop,
        "model": backbone.model_type,
        "openvino": openvino.__version__,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def converted_model(backbone, *, model_cache=None):
    """The backbone as an ``openvino.Model`` with input ``[?, 3, crop, crop]``: from this process,
    from the disk cache, or converted now (and checked against torch, then saved)."""
    digest = network_digest(backbone)
    if digest in _CONVERTED:
        return _CONVERTED[digest]
    if digest in _FAILED:
        raise FeatxError(_FAILED[digest])
    folder = model_cache_dir(model_cache)
    xml = folder / f"{_slug(backbone.name)}-{digest}.xml" if folder else None
    model = _read_saved(xml) if xml is not None else None
    if model is None:
        try:
            model = _convert_and_check(backbone)
        except FeatxError as exc:
            _FAILED[digest] = str(exc)
            raise
        if xml is not None:
            _save(model, xml)
    _CONVERTED[digest] = model
    return model


def model_cache_dir(model_cache=None) -> Path | None:
    """Where converted networks are kept on disk (None: nowhere)."""
    v = os.fspath(model_cache) if model_cache is not None else os.environ.get("FEATX_OPENVINO_CACHE")
    if v is not None:
        return None if v.strip().lower() in ("", "0", "off", "none", "false") else Path(v).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "featx" / "openvino"


def _convert_and_check(backbone):
    """torch -> OpenVINO, then the probe-batch check: same features or a FeatxError."""
    import openvino as ov  # optional extra
    import torch  # heavy

    crop = backbone.preprocess.crop
    model = backbone.model.to("cpu").eval()
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(3, 3, crop, crop, generator=gen)
    name = backbone.name
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer warnings
            ovm = ov.convert_model(model, example_input=probe[:1])
            ovm.reshape([-1, 3, crop, crop])
            want = model(probe.contiguous()).float().numpy()
        got = _core().compile_model(ovm, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(probe.numpy())[0]
    except Exception as exc:  # noqa: BLE001 - any converter failure means "use torch"
        why = (str(exc).strip().splitlines() or [""])[0][:300]
        raise FeatxError(f"backbone {name!r} does not convert to OpenVINO ({type(exc).__name__}: {why})") from None
    got = np.asarray(got, np.float32).reshape(len(probe), -1)
    if got.shape != want.reshape(len(probe), -1).shape:
        raise FeatxError(f"backbone {name!r} converts to OpenVINO with output {got.shape}, torch gives {want.shape}")
    cos = _min_cosine(got, want.reshape(len(probe), -1))
    if not cos >= MIN_COSINE:
        raise FeatxError(
            f"backbone {name!r} converted to OpenVINO gives other features than torch (min cosine {cos:.6f})"
        )
    log.info("converted %s to OpenVINO fp32 (probe batch: min cosine %.7f to torch)", name, cos)
    return ovm


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-30), (np.abs(a - b).max(1) == 0).astype(np.float64))
    return float(cos.min())


def _read_saved(xml: Path):
    if not (xml.is_file() and xml.with_suffix(".bin").is_file()):
        return None
    try:
        model = _core().read_model(str(xml))
    except Exception as exc:  # noqa: BLE001 - a damaged cache file is converted again
        log.warning("cannot read the converted network %s (%s); converting again", xml, exc)
        return None
    log.info("read the converted network %s", xml)
    return model


def _save(model, xml: Path) -> None:
    """Write ``xml`` + ``.bin`` (fp32 weights kept as they are); a failure only costs the next run time."""
    import openvino as ov  # optional extra

    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.tmp.xml")
    try:
        xml.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(tmp, xml)
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation
        log.warning("cannot keep the converted network in %s (%s); set FEATX_OPENVINO_CACHE to a writable folder",
                    xml.parent, exc)
        for p in (tmp, tmp.with_suffix(".bin")):
            try:
                p.unlink()
            except OSError:
                pass


def _compile(model, config: dict):
    """Compile for the CPU; a compiled-model cache that cannot be used only costs time."""
    try:
        return _core().compile_model(model, "CPU", config)
    except RuntimeError as exc:
        if "CACHE_DIR" not in config:
            raise
        log.warning("cannot use the compiled-network cache %s (%s); compiling without it", config["CACHE_DIR"],
                    (str(exc).strip().splitlines() or [""])[0][:200])
        return _core().compile_model(model, "CPU", {k: v for k, v in config.items() if k != "CACHE_DIR"})


def _core():
    import openvino as ov  # optional extra

    if not _CORE:
        _CORE.append(ov.Core())
    return _CORE[0]


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in s).strip("-") or "net"
