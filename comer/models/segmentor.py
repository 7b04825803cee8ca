"""Encoder-decoder segmentor (mmseg ``EncoderDecoder``): backbone -> decode head (+ auxiliary
head for training), cross-entropy losses, whole / sliding-window inference with flip and
multi-scale test-time augmentation."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

HeadFactory = Callable[..., nn.Module]
INFERENCE_MODES = ("whole", "slide")


def _pair(value, name: str) -> tuple[int, int]:
    pair = tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value), int(value))
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Top/left coordinates of mmseg's sliding windows along one axis.

    Windows start every ``stride`` pixels; the last one is shifted back so that it ends at the
    image border (windows never leave the image). An axis shorter than ``crop`` gets one window.
    """
    count = max(length - crop + stride - 1, 0) // stride + 1
    return [max(min(i * stride + crop, length) - crop, 0) for i in range(count)]


def segmentation_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    avg_non_ignore: bool,
    align_corners: bool,
) -> torch.Tensor:
    """Pixel-wise cross-entropy of ``logits`` [B,C,h,w] upsampled (bilinear) to ``labels`` [B,H,W].

    Like mmseg's ``CrossEntropyLoss`` (its default ``avg_non_ignore=False``) the mean runs over
    all pixels, ignored ones contributing zero; with ``avg_non_ignore`` it runs over the
    non-ignored pixels only. A batch with no valid pixel gives 0 (never NaN) either way.
    """
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=align_corners)
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    if not avg_non_ignore:
        return per_pixel.mean()
    valid = (labels != ignore_index).sum().clamp(min=1)
    return per_pixel.sum() / valid


class EncoderDecoder(nn.Module):
    """``backbone`` -> ``decode_head`` (logits at the head's stride) -> upsampled to the input.

    Args:
        backbone: module returning a dict of feature maps.
        decode_head, auxiliary_head: modules taking that dict and returning logits [B,C,h,w].
        aux_loss_weight: factor on the auxiliary loss (0.4 in the UperNet recipe).
        ignore_index: label value excluded from losses (255).
        align_corners: for every bilinear resize of logits (mmseg's head setting).
        avg_non_ignore: average the loss over non-ignored pixels only (mmseg default: False).
        max_windows_per_forward: sliding windows per image that go through the network together.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: nn.Module,
        auxiliary_head: nn.Module | None = None,
        aux_loss_weight: float = 0.4,
        ignore_index: int = 255,
        align_corners: bool = False,
        avg_non_ignore: bool = False,
        max_windows_per_forward: int = 8,
    ) -> None:
        super().__init__()
        if max_windows_per_forward < 1:
            raise ValueError(f"max_windows_per_forward must be >= 1, got {max_windows_per_forward}")
        self.max_windows_per_forward = max_windows_per_forward
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_loss_weight = aux_loss_weight
        self.ignore_index = ignore_index
        self.align_corners = align_corners
        self.avg_non_ignore = avg_non_ignore

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def _resize(self, x: torch.Tensor, size) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=self.align_corners)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes, H, W] at the input size."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B,3,H,W], got shape {tuple(images.shape)}")
        return self._resize(self.decode_head(self.backbone(images)), images.shape[-2:])

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.dim() != 3 or labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64 [B,H,W], got {labels.dtype} {tuple(labels.shape)}")
        invalid = (labels != self.ignore_index) & ((labels < 0) | (labels >= self.num_classes))
        if bool(invalid.any()):
            bad = torch.unique(labels[invalid])[:10].tolist()
            raise ValueError(
                f"labels hold values {bad} outside [0, {self.num_classes}) and != ignore_index "
                f"{self.ignore_index}"
            )

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss_seg", "loss_aux"}`` (the latter already multiplied by ``aux_loss_weight``;
        present only with an auxiliary head). Logits are upsampled to the label size."""
        self._check_labels(labels)
        features = self.backbone(images)
        ce = dict(ignore_index=self.ignore_index, avg_non_ignore=self.avg_non_ignore, align_corners=self.align_corners)
        losses = {"loss_seg": segmentation_cross_entropy(self.decode_head(features), labels, **ce)}
        if self.auxiliary_head is not None:
            aux = segmentation_cross_entropy(self.auxiliary_head(features), labels, **ce)
            losses["loss_aux"] = self.aux_loss_weight * aux
        return losses

    # ------------------------------------------------------------------ inference
    def slide_logits(self, images: torch.Tensor, crop_size, stride) -> torch.Tensor:
        """Logits at the input size from overlapping ``crop_size`` windows every ``stride`` pixels,
        averaged where they overlap (mmseg's ``slide_inference``). Windows stay inside the image; on an
        axis shorter than the crop every window is the whole axis, fed as it is (never padded)."""
        crop_h, crop_w = _pair(crop_size, "crop_size")
        stride_h, stride_w = _pair(stride, "stride")
        if stride_h > crop_h or stride_w > crop_w:
            raise ValueError(f"stride {stride} larger than crop_size {crop_size} would leave gaps")
        batch, _, height, width = images.shape
        # Every window has this size: windows end at the border, so only an axis shorter than the crop
        # gives a smaller one, and then all windows are that whole axis.
        h, w = min(crop_h, height), min(crop_w, width)
        windows = [(top, left) for top in window_starts(height, crop_h, stride_h)
                   for left in window_starts(width, crop_w, stride_w)]
        # The windows go through the network together, max_windows_per_forward images' worth at a time
        # (eval mode: BatchNorm does not mix them); the order of crops is window-major, batch-minor.
        crops = torch.cat([images[..., top : top + h, left : left + w] for top, left in windows])
        chunks = crops.split(self.max_windows_per_forward * batch)
        window_logits = torch.cat([self(chunk) for chunk in chunks]).split(batch)
        sums = images.new_zeros(batch, self.num_classes, height, width)
        counts = images.new_zeros(1, 1, height, width)
        for (top, left), logits in zip(windows, window_logits):
            sums[..., top : top + h, left : left + w] += logits
            counts[..., top : top + h, left : left + w] += 1
        return sums / counts

    @torch.no_grad()
    def inference(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        mode: str = "whole",
        crop_size=(512, 512),
        stride=(341, 341),
        flip: bool = False,
        output_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Class probabilities [B, C, *output_size] (default: the first view's size).

        ``images``: the normalised test input [B,3,H,W], or one such view per test scale, each made by
        the data pipeline from the original image (mmseg's ``MultiScaleFlipAug``: resized to the scaled
        test size, sides up to a multiple of 32). As mmseg's test path: every view (and its horizontal
        flip when ``flip``) gives logits (whole image or sliding window), resized to ``output_size``,
        turned into softmax probabilities, flipped back; the probabilities of all views are averaged.
        Single view: argmax equals that of the logits. Call it with the model in eval mode.
        """
        if mode not in INFERENCE_MODES:
            raise ValueError(f"inference mode {mode!r} not in {INFERENCE_MODES}")
        views = [images] if isinstance(images, torch.Tensor) else list(images)
        if not views:
            raise ValueError("inference needs at least one view of the images")
        output_size = tuple(views[0].shape[-2:]) if output_size is None else tuple(int(s) for s in output_size)
        flips = (False, True) if flip else (False,)
        total = None
        for view in views:
            for flipped in flips:
                x = view.flip(-1) if flipped else view
                logits = self.slide_logits(x, crop_size, stride) if mode == "slide" else self(x)
                probs = self._resize(logits, output_size).softmax(dim=1)
                probs = probs.flip(-1) if flipped else probs
                total = probs if total is None else total + probs
        return total / (len(views) * len(flips))


def build_segmentor(
    backbone: nn.Module,
    decode_head: HeadFactory,
    auxiliary_head: HeadFactory | None = None,
    *,
    num_classes: int,
    **kwargs,
) -> EncoderDecoder:
    """Build an :class:`EncoderDecoder`; the heads are factories (Hydra ``_partial_: true``)
    called with ``input_shape=backbone.output_shape(), num_classes=num_classes`` so that configs
    never repeat the backbone's channels. ``kwargs`` go to :class:`EncoderDecoder`."""
    if not hasattr(backbone, "output_shape"):
        raise TypeError(f"backbone {type(backbone).__name__} has no output_shape(); see docs/contracts.md")
    input_shape: Mapping = backbone.output_shape()
    heads = [decode_head] + ([auxiliary_head] if auxiliary_head is not None else [])
    for head in heads:
        if isinstance(head, nn.Module) or not callable(head):
            raise TypeError(
                f"heads must be factories (Hydra `_partial_: true`) taking input_shape and num_classes, got {type(head).__name__}"
            )
    decode = decode_head(input_shape=input_shape, num_classes=num_classes)
    aux = auxiliary_head(input_shape=input_shape, num_classes=num_classes) if auxiliary_head is not None else None
    return EncoderDecoder(backbone, decode, aux, **kwargs)
