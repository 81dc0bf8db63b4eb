"""Images as uint8 tensors, the way the Pillow path sees them: EXIF orientation and the backbone's
preprocessing on batches (used by the GPU engine, :mod:`featx.embedding.engines.gpu`)."""

from __future__ import annotations


def apply_exif_orientation(img, orientation: int):
    """Rotate/flip a [C, H, W] tensor the way ``PIL.ImageOps.exif_transpose`` does."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-1, -2)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


class TensorPreprocess:
    """The backbone's :class:`~featx.embedding.backbones.Preprocess` on uint8 image tensors, batched.

    Mirrors ``Preprocess.pil_transform()`` step for step (uint8 resize of the short side with
    the same interpolation and antialias, centre crop, scale to [0, 1], normalise), so that a
    decoded image gives the same network input on either path.
    """

    def __init__(self, preprocess, device) -> None:
        import torch
        from torchvision.transforms import v2

        self.pre = preprocess
        self.interp = (
            v2.InterpolationMode.BICUBIC if preprocess.interpolation == "bicubic" else v2.InterpolationMode.BILINEAR
        )
        self.mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, imgs: list) -> "torch.Tensor":  # noqa: F821
        """uint8 [3, H, W] tensors (any sizes, same device) -> float32 [N, 3, crop, crop]."""
        import torch
        from torchvision.transforms.v2 import functional as TF

        crop = self.pre.crop
        out = [None] * len(imgs)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, im in enumerate(imgs):
            groups.setdefault(tuple(im.shape[-2:]), []).append(j)
        for js in groups.values():
            x = torch.stack([imgs[j] for j in js]) if len(js) > 1 else imgs[js[0]].unsqueeze(0)
            x = TF.resize(x, [self.pre.resize], interpolation=self.interp, antialias=True)
            x = TF.center_crop(x, [crop, crop])
            for k, j in enumerate(js):
                out[j] = x[k]
        if not out:
            return torch.empty(0, 3, crop, crop, device=self.mean.device)
        x = torch.stack(out).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std)
