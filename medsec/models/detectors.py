"""Object detectors as plain modules with one interface, whatever library builds them.

A detector takes images in [0, 1] (``(N, C, *spatial)``, one or three channels; it normalises
internally) and per-image targets ``{"boxes": (K, 2 * dims), "labels": (K,)}``. Boxes are in corner
form along the array axes (``(min_0, min_1, max_0, max_1)``: row first; MONAI's standard mode) in
pixel-edge coordinates; labels are 0-based foreground classes. ``detector(images)`` (evaluation
mode) returns one ``{"boxes", "scores", "labels"}`` per image; ``detector.losses(images, targets)``
returns the training losses by name in either mode (batch-norm statistics are not updated in
evaluation mode), which is what training and attacks minimise or ascend.

Networks: torchvision's Faster R-CNN (ResNet-50 FPN v2, MobileNetV3-Large FPN, or any ResNet FPN
such as ResNet-18) and RetinaNet (ResNet-50 FPN v2) for 2D, and MONAI's RetinaNet for 2D and 3D.
No weights are ever downloaded: everything starts from random initialisation (``model.pretrained``
or ``model.init_from`` load local files).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medsec.errors import ConfigError

Target = dict[str, torch.Tensor]
SWAP_2D = [1, 0, 3, 2]
"""Row-first (array axes) <-> torchvision's (x1, y1, x2, y2): the same permutation both ways."""
TORCHVISION = ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet_fpn",
               "retinanet_resnet50_fpn_v2")


def _levels(sizes: Sequence[Any], count: int, what: str) -> tuple[tuple[float, ...], ...]:
    """One tuple per feature map: ``sizes`` is one list for every map, or one list per map."""
    if sizes and not isinstance(sizes[0], (int, float)):  # lists (or Hydra's ListConfigs) per map
        if len(sizes) != count:
            raise ConfigError(f"model.net.{what}: {len(sizes)} lists for a backbone with {count} feature maps")
        return tuple(tuple(float(s) for s in level) for level in sizes)
    return (tuple(float(s) for s in sizes),) * count


def _keep_size(image: torch.Tensor, target: Target | None = None) -> tuple[torch.Tensor, Target | None]:
    """Replaces torchvision's resizing: the data pipeline decides the size."""
    return image, target


class Detector(nn.Module):
    """The interface every medsec detector has (see the module docstring)."""

    spatial_dims: int = 2

    def losses(self, images: torch.Tensor, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def detect(self, images: torch.Tensor) -> list[Target]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> list[Target]:
        return self.detect(images)


class TorchvisionDetector(Detector):
    """A torchvision detection model on our conventions: 1-channel images repeated to RGB, boxes
    swapped to (x, y) order, labels shifted for Faster R-CNN's background class, and no resizing
    (images are used at the size the data pipeline gives them)."""

    def __init__(self, model: nn.Module, in_channels: int, background: bool) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ConfigError(f"torchvision detectors take 1 or 3 channels, got {in_channels}")
        self.model = model
        self.in_channels = in_channels
        self.offset = 1 if background else 0
        model.transform.resize = _keep_size  # use images at the size the data give

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def _inputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.shape[1] != self.in_channels:
            raise ValueError(f"the detector takes {self.in_channels} channel(s), got images of shape "
                             f"{tuple(images.shape)}")
        return list(images.expand(-1, 3, -1, -1) if self.in_channels == 1 else images)

    def losses(self, images: torch.Tensor, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        torch_targets = [{"boxes": t["boxes"][:, SWAP_2D].float(), "labels": t["labels"].long() + self.offset}
                         for t in targets]
        training = self.model.training
        self.model.train()  # torchvision computes losses only in training mode ...
        if not training:  # ... but evaluation keeps batch-norm statistics (and dropout) fixed
            for module in self.model.modules():
                if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.Dropout)):
                    module.eval()
        try:
            return self.model(self._inputs(images), torch_targets)
        finally:
            self.model.train(training)

    def detect(self, images: torch.Tensor) -> list[Target]:
        training = self.model.training
        self.model.eval()
        try:
            outputs = self.model(self._inputs(images))
        finally:
            self.model.train(training)
        return [{"boxes": o["boxes"][:, SWAP_2D], "scores": o["scores"], "labels": o["labels"] - self.offset}
                for o in outputs]


def torchvision_detector(
    num_classes: int,
    in_channels: int = 1,
    spatial_dims: int = 2,
    architecture: str = "fasterrcnn_mobilenet_v3_large_fpn",
    backbone: str = "resnet18",
    anchor_sizes: Sequence[Any] | None = None,
    aspect_ratios: Sequence[Any] = (0.5, 1.0, 2.0),
    score_threshold: float = 0.05,
    nms_threshold: float = 0.5,
    detections_per_image: int = 100,
    representation_size: int | None = None,
    fpn_channels: int = 256,
    returned_layers: Sequence[int] = (1, 2, 3, 4),
    **kwargs: Any,
) -> TorchvisionDetector:
    """A torchvision detector for ``num_classes`` foreground classes, randomly initialised.

    Args:
        architecture: ``fasterrcnn_resnet50_fpn_v2``, ``fasterrcnn_mobilenet_v3_large_fpn``,
            ``fasterrcnn_resnet_fpn`` (any torchvision ResNet named by ``backbone``, e.g. the
            small ``resnet18``) or ``retinanet_resnet50_fpn_v2``.
        anchor_sizes: anchor edge lengths in pixels: one list for every feature map, or one list
            per map (5 maps for the ResNet FPNs, 3 for MobileNet); ``None``: torchvision's
            (32 to 512 px, meant for 800-px images).
        aspect_ratios: anchor height/width ratios (one list, or one per map).
        score_threshold, nms_threshold, detections_per_image: post-processing.
        representation_size: width of Faster R-CNN's two-layer box head (torchvision: 1024, a
            12.8-million-weight first layer that dominates the cost on small images).
        fpn_channels, returned_layers: ``fasterrcnn_resnet_fpn`` only: the FPN's width and the
            ResNet stages it reads (1 = stride 4 ... 4 = stride 32; one more map is pooled from
            the last), so small data can use a small, cheap detector.
        kwargs: further arguments of torchvision's ``FasterRCNN`` / ``RetinaNet``.
    """
    from torchvision.models import detection
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.models.detection.rpn import RPNHead

    if spatial_dims != 2:
        raise ConfigError(f"model.net: torchvision detectors are 2D; for {spatial_dims}D data use "
                          "model=retinanet_monai")
    if architecture not in TORCHVISION:
        raise ConfigError(f"model.net.architecture must be one of {list(TORCHVISION)}, got {architecture!r}")
    retina = architecture.startswith("retinanet")
    post = ({"score_thresh": score_threshold, "nms_thresh": nms_threshold, "detections_per_img": detections_per_image}
            if retina else {"box_score_thresh": score_threshold, "box_nms_thresh": nms_threshold,
                            "box_detections_per_img": detections_per_image})
    classes = num_classes if retina else num_classes + 1
    common = {"weights": None, "weights_backbone": None, "num_classes": classes, **post, **kwargs}
    if architecture == "fasterrcnn_resnet_fpn":
        fpn = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=5,
                                  returned_layers=list(returned_layers))
        if fpn_channels != fpn.out_channels:
            from torchvision.models.detection.backbone_utils import BackboneWithFPN
            from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

            fpn = BackboneWithFPN(fpn.body, {f"layer{k}": str(i) for i, k in enumerate(returned_layers)},
                                  fpn.fpn.inner_blocks and [b[0].in_channels for b in fpn.fpn.inner_blocks],
                                  fpn_channels, extra_blocks=LastLevelMaxPool())
        from torchvision.ops import MultiScaleRoIAlign

        maps = [str(i) for i in range(len(returned_layers))]
        default = AnchorGenerator(((32.0,),) * (len(maps) + 1), ((0.5, 1.0, 2.0),) * (len(maps) + 1))
        model = detection.FasterRCNN(fpn, classes, rpn_anchor_generator=default,
                                     box_roi_pool=MultiScaleRoIAlign(maps, 7, 2), **post, **kwargs)
    else:
        model = getattr(detection, architecture)(**common)
    if anchor_sizes is not None:
        generator = model.anchor_generator if retina else model.rpn.anchor_generator
        count = len(generator.sizes)
        sizes = _levels(anchor_sizes, count, "anchor_sizes")
        ratios = _levels(aspect_ratios, count, "aspect_ratios")
        anchors = AnchorGenerator(sizes, ratios)
        per_location = anchors.num_anchors_per_location()
        if len(set(per_location)) != 1:
            raise ConfigError("model.net: every feature map needs the same number of anchors "
                              f"(sizes x ratios), got {per_location}")
        channels = model.backbone.out_channels
        if retina:
            model.anchor_generator = anchors
            norm = torch.nn.GroupNorm if architecture.endswith("_v2") else None
            model.head = RetinaNetHead(channels, per_location[0], num_classes,
                                       **({"norm_layer": lambda c: norm(32, c)} if norm else {}))
        else:
            model.rpn.anchor_generator = anchors
            conv_depth = len(model.rpn.head.conv) if architecture.endswith("_v2") else 1
            model.rpn.head = RPNHead(channels, per_location[0], conv_depth=conv_depth)
    if representation_size is not None and not retina:
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

        resolution = model.roi_heads.box_roi_pool.output_size[0]
        model.roi_heads.box_head = TwoMLPHead(model.backbone.out_channels * resolution**2, representation_size)
        model.roi_heads.box_predictor = FastRCNNPredictor(representation_size, classes)
    return TorchvisionDetector(model, in_channels, background=not retina)


class MonaiDetector(Detector):
    """MONAI's ``RetinaNetDetector`` on our conventions (MONAI's boxes are already row-first corners
    along the array axes; it takes images in [0, 1] as they are)."""

    def __init__(self, detector: nn.Module, spatial_dims: int) -> None:
        super().__init__()
        self.detector = detector
        self.spatial_dims = spatial_dims

    @property
    def backbone(self) -> nn.Module:
        return self.detector.network.feature_extractor.body

    def losses(self, images: torch.Tensor, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        targets = [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets]
        training = self.detector.training
        self.detector.train()
        if not training:  # evaluation keeps batch-norm statistics fixed
            for module in self.detector.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        try:
            return self.detector(images, targets)
        finally:
            self.detector.train(training)

    def detect(self, images: torch.Tensor) -> list[Target]:
        training = self.detector.training
        self.detector.eval()
        try:
            outputs = self.detector(images)
        finally:
            self.detector.train(training)
        return [{"boxes": o["boxes"], "scores": o["labels_scores"], "labels": o["labels"]} for o in outputs]


def monai_retinanet(
    num_classes: int,
    in_channels: int = 1,
    spatial_dims: int = 3,
    layers: Sequence[int] = (1, 1, 1, 1),
    widths: Sequence[int] = (32, 64, 128, 256),
    returned_layers: Sequence[int] = (1, 2),
    fpn_channels: int = 64,
    conv1_stride: int = 1,
    anchor_sizes: Sequence[float] = (8, 12, 16),
    anchor_shapes: Sequence[Sequence[float]] | None = None,
    feature_map_scales: Sequence[int] | None = None,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.3,
    detections_per_image: int = 100,
    topk_candidates_per_level: int = 1000,
    atss_candidates: int = 4,
    negatives_per_image: int = 64,
    positive_fraction: float = 0.3,
) -> MonaiDetector:
    """MONAI's RetinaNet (ResNet FPN, ATSS matching, hard negative sampling: MONAI's LUNA16 recipe)
    for 2D or 3D images, randomly initialised.

    Args:
        layers, widths: residual blocks and channels per ResNet stage (``(1, 1, 1, 1)``: a ResNet-10;
            MONAI's widths are 64 to 512, costly in 3D on a CPU).
        returned_layers: the stages the FPN reads (1 = the first); one more map is pooled.
        fpn_channels: the FPN's and the heads' width (MONAI's default: 256).
        conv1_stride: stride of the stem (1 keeps small volumes' resolution).
        anchor_sizes: anchor edge lengths in pixels/voxels on the finest map (square/cubic anchors,
            one per size); coarser maps scale them.
        anchor_shapes: instead of ``anchor_sizes``, one shape per anchor with ``spatial_dims`` edge
            lengths in array axis order (e.g. elongated structures).
        feature_map_scales: each FPN map's downsampling relative to the finest (default 1, 2, 4, ...).
        score_threshold, nms_threshold, detections_per_image, topk_candidates_per_level: post-processing.
        atss_candidates, negatives_per_image, positive_fraction: training-time matching and sampling.
    """
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
    from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
    from monai.networks.blocks.feature_pyramid_network import LastLevelMaxPool
    from monai.networks.nets import resnet

    if spatial_dims not in (2, 3):
        raise ConfigError(f"model.net: MONAI RetinaNet is 2D or 3D, got spatial_dims={spatial_dims}")
    shapes = ([tuple(float(s) for s in shape) for shape in anchor_shapes] if anchor_shapes
              else [(float(size),) * spatial_dims for size in anchor_sizes])
    if any(len(shape) != spatial_dims for shape in shapes):
        raise ConfigError(f"model.net.anchor_shapes: every anchor needs {spatial_dims} edge lengths, got {shapes}")
    if not set(returned_layers) <= {1, 2, 3, 4}:
        raise ConfigError(f"model.net.returned_layers must be among 1..4, got {list(returned_layers)}")
    backbone = resnet.ResNet(block=resnet.ResNetBlock, layers=list(layers), block_inplanes=list(widths),
                             n_input_channels=in_channels, conv1_t_stride=conv1_stride, conv1_t_size=3,
                             spatial_dims=spatial_dims)
    extractor = BackboneWithFPN(backbone, {f"layer{k}": str(i) for i, k in enumerate(returned_layers)},
                                [int(widths[k - 1]) for k in returned_layers], fpn_channels,
                                spatial_dims=spatial_dims, extra_blocks=LastLevelMaxPool(spatial_dims))
    scales = list(feature_map_scales) if feature_map_scales else [2**k for k in range(len(returned_layers) + 1)]
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=scales, base_anchor_shapes=shapes)
    # the stem pools by 2 after conv1, each stage after the first halves again
    size_divisible = conv1_stride * 2 * 2 ** max(returned_layers)
    network = RetinaNet(spatial_dims=spatial_dims, num_classes=num_classes,
                        num_anchors=anchors.num_anchors_per_location()[0], feature_extractor=extractor,
                        size_divisible=size_divisible)
    detector = RetinaNetDetector(network=network, anchor_generator=anchors, spatial_dims=spatial_dims,
                                 num_classes=num_classes, size_divisible=size_divisible)
    detector.set_target_keys(box_key="boxes", label_key="labels")
    detector.set_atss_matcher(num_candidates=atss_candidates, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=negatives_per_image, positive_fraction=positive_fraction,
                                       pool_size=20, min_neg=16)
    detector.set_box_selector_parameters(score_thresh=score_threshold, topk_candidates_per_level=topk_candidates_per_level,
                                         nms_thresh=nms_threshold, detections_per_img=detections_per_image)
    return MonaiDetector(detector, spatial_dims)
