"""Stage 2, embedding: backbones, the CPU and GPU engines, the resumable runner, the extractor."""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "Backbone": "backbones",
    "Preprocess": "backbones",
    "create_backbone": "backbones",
    "list_backbones": "backbones",
    "FeatureExtractor": "extractor",
    "embed_files": "extractor",
    "EmbedStats": "runner",
    "cache_fingerprint": "runner",
    "embed": "runner",
    "ShardResult": "runner",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
