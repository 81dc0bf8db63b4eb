"""Runs: the commands that drive several stages (probe, few-shot, audit, predict, compare, export-model) and
publish their results.

Each run reads a cache or images through the stages below it and writes its run folder whole (staged, then
swapped in; JSON first, so a failing report never loses results).  probe, fewshot, compare and audit return
a result dataclass with ``to_dict()``; predict and the publish functions return plain dicts.  Only
``featx.cli`` sits above.
"""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "probe": "probe",
    "ProbeResult": "probe",
    "fewshot": "fewshot",
    "FewShotResult": "fewshot",
    "predict": "predict",
    "compare": "compare",
    "CompareSettings": "compare",
    "audit": "audit",
    "AuditResult": "audit",
    "publish_run": "publish",
    "publish_existing_run": "publish",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
