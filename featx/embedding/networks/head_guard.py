"""Before ``featx predict`` builds a backbone for a saved head: the head must not choose a download.

Why: the backbone name and weights in a head's sidecar come from whoever sent the head.  A name
such as ``timm:hf-hub:attacker/evil-model`` would make timm fetch (and run) a model from the
network.  So the sidecar is checked against what featx builds and what the user gave (``--weights``)
first, and the backbone is then built with downloads switched off: the weights must already be
here (a local file, the offline default, or a copy an earlier ``featx embed`` downloaded).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Iterator

from ...base.errors import FeatxError
from ...base.io import sha256_file
from ..backbones import list_backbones

# A registry name or timm:<model>: no hub prefix, no path, no URL.
_NAME = re.compile(r"^(timm:)?[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


def check_head_backbone(meta: dict, *, weights, head: str) -> None:
    """Refuse a sidecar whose backbone featx would not build, or that the user's ``--weights`` contradict.

    A head trained on a cache set (``--backbone a,b``) names ``a+b`` and one fingerprint per member:
    each member is checked the same way (``weights`` may then be ``{member: weights}``).
    """
    name = meta.get("backbone")
    fp = meta.get("fingerprint_dict") or {}
    members = fp.get("members")
    if isinstance(members, dict) and members:
        if name != "+".join(members):
            raise FeatxError(f"head {head}: its sidecar names backbone {str(name)[:80]!r} but was trained on the "
                             f"set {'+'.join(map(str, members))[:80]!r}; {_FIX}")
        for n, mfp in members.items():
            w = weights.get(n) if isinstance(weights, dict) else weights
            _check_one(n, mfp if isinstance(mfp, dict) else {}, w, head)
        return
    if isinstance(weights, dict):
        raise FeatxError(f"head {head}: per-backbone weights given for a head of one backbone; {_FIX}")
    _check_one(name, fp, weights, head)


_FIX = "the head was not applied and nothing was downloaded; re-create the head with `featx probe`"


def _check_one(name, fp: dict, weights, head: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or not (name.startswith("timm:") or name in list_backbones()):
        raise FeatxError(f"head {head}: its sidecar names backbone {str(name)[:80]!r}, which is not a backbone featx "
                         f"builds (one of {', '.join(list_backbones())} or timm:<model>); {_FIX}")
    if fp.get("backbone") not in (None, name):
        raise FeatxError(f"head {head}: its sidecar names backbone {name!r} but was trained on "
                         f"{str(fp.get('backbone'))[:80]!r}; {_FIX}")
    if weights not in (None, "random") and os.path.isfile(weights) and fp.get("weights_sha256"):
        sha = sha256_file(weights)
        if sha != fp["weights_sha256"]:
            raise FeatxError(f"--weights {weights}: weights_sha256 {sha[:12]}..., but head {head} was trained on "
                             f"{str(fp['weights_sha256'])[:12]}...; pass the weights the head was trained with")


class _NoDownload(Exception):
    pass


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """Switch off the Hugging Face hub and torch.hub downloads while a head's backbone is built."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    patched = []
    hub_consts = sys.modules.get("huggingface_hub.constants")
    if hub_consts is not None and hasattr(hub_consts, "HF_HUB_OFFLINE"):
        patched.append((hub_consts, "HF_HUB_OFFLINE", hub_consts.HF_HUB_OFFLINE))
        hub_consts.HF_HUB_OFFLINE = True
    torch_hub = sys.modules.get("torch.hub")
    if torch_hub is not None:
        def refuse(url, *a, **k):
            raise _NoDownload(f"featx predict does not download what a head names ({url})")
        patched.append((torch_hub, "download_url_to_file", torch_hub.download_url_to_file))
        torch_hub.download_url_to_file = refuse
    try:
        yield
    finally:
        for mod, attr, old in patched:
            setattr(mod, attr, old)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
