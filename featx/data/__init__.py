"""Stage 1, data: find the images (folders or a CSV manifest), load them, split them."""

from ..base.lazy import lazy_exports

_EXPORTS = {
    "IMAGE_EXTENSIONS": "folders",
    "SPLIT_NAMES": "folders",
    "Dataset": "folders",
    "Sample": "folders",
    "class_name": "folders",
    "discover": "folders",
    "is_image_name": "folders",
    "ImageLoadError": "images",
    "load_image": "images",
    "load_or_blank": "images",
    "carve_validation": "splits",
    "plan_folds": "splits",
    "train_eval_split": "splits",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
