"""``threengan export --format onnx``: the classifier as one ONNX graph, and classify with it.

The graph is built node by node from the NumPy engine's weights (:mod:`numpy_engine`,
BatchNorm already folded into the convolutions), so export needs neither torch nor its
exporter, only the ``onnx`` package; running it needs only ``onnxruntime``
(``pip install 'threengan[onnx]'``). It takes what ``classify`` feeds its engines:

    images          uint8 (N, S, S): each X-ray decoded to grayscale and resized to S x S
                    by threengan's ``images.load_image`` (metadata ``preprocessing``)

and gives

    probabilities   float32 (N, K): softmax(logits / temperature), the model's calibration
    ood_score       float32 (N,): the out-of-distribution score (``ood``: the first
                    stage's map averaged over 4x4 blocks, or for older models the last
                    map over 2x2 blocks, centred, projected, mean of squares; where the
                    model has a pixel Gaussian, the sum of that and the image's 4x4 blocks'
                    score, each over its scale, for older models the larger); only for a model
                    with statistics
    evidence        float32 (N, K, 4, 4): each position's evidence for each class
                    (:mod:`infer.heatmap`), which ``classify --heatmaps`` draws

The scaling of uint8 pixels to the model's range is inside the graph; decoding and resizing
cannot be, and are recorded in the metadata (``threengan`` entry, JSON: classes, image
size, fit, normalisation, thresholds, the source checkpoint) and in docs/visual.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from threengan_cli import __version__
from threengan_cli.core import fileio
from threengan_cli.core.errors import Failure
from threengan_cli.infer import engine, ood
from threengan_cli.infer.numpy_engine import NumpyClassifier
from threengan_cli.model import modelfile

OPSET = 17
META_KEY = "threengan"
FORMAT = 1
SUFFIX = ".onnx"
_K = 4

PREPROCESSING = (
    "Decode the file to 8-bit grayscale (a JPEG in draft mode, DICOM windowed as threengan "
    "prepare does), resize it to image_size x image_size with fit ('squash': the whole image "
    "resized, aspect ratio not kept; 'pad': letterboxed; 'crop': centre-cropped) using "
    "Pillow's reducing_gap resize, as threengan_cli.data.images.load_image does; feed the uint8 "
    "array (N, image_size, image_size). The graph scales pixels to the model's range "
    "(x * scale + offset)."
)


def _weight(kernel: np.ndarray, channels: int) -> np.ndarray:
    """The NumPy engine's (k*k*C, O) matrix back to a convolution weight (O, C, k, k)."""
    out = kernel.shape[1]
    return np.ascontiguousarray(kernel.T.reshape(out, _K, _K, channels).transpose(0, 3, 1, 2))


def build(model: NumpyClassifier):
    """The classifier of ``model`` as an ``onnx.ModelProto`` (module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    weights: list = []

    def const(name: str, value) -> str:
        weights.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    side = model.image_size
    temperature = model.stats.temperature if model.stats is not None else 1.0
    x = node("Cast", ["images"], "pixels", to=TensorProto.FLOAT)
    x = node("Mul", [x, const("scale", np.float32(model.scale))], "scaled")
    x = node("Add", [x, const("offset", np.float32(model.offset))], "shifted")
    x = node("Unsqueeze", [x, const("channel_axis", np.array([1], np.int64))], "x0")  # N,1,S,S
    channels = 1
    first = None
    for i, (kernel, shift) in enumerate(model.layers):
        w = _weight(kernel, channels)
        channels = w.shape[0]
        inputs = [x, const(f"conv{i}.weight", w)]
        if shift is not None:
            inputs.append(const(f"conv{i}.bias", shift.astype(np.float32)))
        x = node("Conv", inputs, f"conv{i}", kernel_shape=[_K, _K], strides=[2, 2], pads=[1] * 4)
        x = node("LeakyRelu", [x], f"act{i}", alpha=0.2)  # (N, C_i, S/2^(i+1), S/2^(i+1))
        first = first or x
    last = x  # (N, C, 4, 4)
    head_kernel, bias = model.head
    head = _weight(head_kernel, channels)  # (outputs, C, 4, 4)
    classes = len(model.classes)
    inputs = [last, const("head.weight", head)]
    if bias is not None:
        inputs.append(const("head.bias", bias.astype(np.float32)))
    logits = node("Conv", inputs, "head", kernel_shape=[_K, _K])  # (N, outputs, 1, 1)
    logits = node("Flatten", [logits], "all_logits", axis=1)
    logits = node(
        "Slice",
        [logits, const("from", np.array([0], np.int64)), const("to", np.array([classes], np.int64)),
         const("axis1", np.array([1], np.int64))],
        "logits",
    )  # fmt: skip
    logits = node("Div", [logits, const("temperature", np.float32(temperature))], "calibrated")
    node("Softmax", [logits], "probabilities", axis=1)
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])]
    if model.stats is not None:
        if model.stats.layer == "first":  # the first stage's 4x4 blocks (ood.py)
            k = [side // 2 // ood.FIRST_GRID] * 2
            f = node("AveragePool", [first], "blocks", kernel_shape=k, strides=k)
        else:
            f = node("AveragePool", [last], "blocks", kernel_shape=[2, 2], strides=[2, 2])
        f = node("Transpose", [f], "blocks_last", perm=[0, 2, 3, 1])  # (row, column, channel)
        f = node("Reshape", [f, const("rows", np.array([0, -1], np.int64))], "features")
        f = node("Sub", [f, const("ood_mean", model.stats.mean)], "centred")
        z = node("MatMul", [f, const("ood_projection", model.stats.projection)], "whitened")
        z = node("Mul", [z, z], "squares")
        pixels = model.stats.pixels
        if pixels is None:
            node("ReduceMean", [z], "ood_score", axes=[1], keepdims=0)
        else:  # the sum (or the larger) of the feature and the pixel score, each scaled
            feature = node("ReduceMean", [z], "feature_score", axes=[1], keepdims=0)
            # the image's 4x4 blocks of pixels in [0, 1] (ood.pixel_features), row-major
            p = node("Unsqueeze", ["pixels", const("p_axis", np.array([1], np.int64))], "p0")
            p = node("AveragePool", [p], "p_blocks", kernel_shape=[side // 4] * 2,
                     strides=[side // 4] * 2)  # fmt: skip
            p = node("Reshape", [p, const("p_rows", np.array([0, -1], np.int64))], "p_flat")
            p = node("Div", [p, const("p_max", np.float32(255.0))], "p_features")
            p = node("Sub", [p, const("p_mean", pixels.mean)], "p_centred")
            p = node("MatMul", [p, const("p_projection", pixels.projection)], "p_whitened")
            p = node("Mul", [p, p], "p_squares")
            pixel = node("ReduceMean", [p], "pixel_score", axes=[1], keepdims=0)
            a = node("Div", [feature, const("feature_scale", pixels.scales[0])], "feature_scaled")
            b = node("Div", [pixel, const("pixel_scale", pixels.scales[1])], "pixel_scaled")
            node("Sum" if pixels.combine == "sum" else "Max", [a, b], "ood_score")
        outputs.append(helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["N"]))
    # Evidence: each position's terms of the class logits, centred over the classes and
    # divided by the temperature: linear in the map, so one Einsum with centred weights.
    terms = head[:classes].reshape(classes, channels, _K * _K).astype(np.float64)
    centred = ((terms - terms.mean(axis=0)) / temperature).astype(np.float32)
    flat = node("Reshape", [last, const("positions", np.array([0, 0, -1], np.int64))], "flat")
    e = node("Einsum", [flat, const("evidence.weight", centred)], "terms", equation="ncp,kcp->nkp")
    node("Reshape", [e, const("grid", np.array([0, 0, _K, _K], np.int64))], "evidence")
    outputs.append(
        helper.make_tensor_value_info("evidence", TensorProto.FLOAT, ["N", classes, _K, _K])
    )
    graph = helper.make_graph(
        nodes,
        "threengan_classifier",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", side, side])],
        outputs,
        initializer=weights,
    )
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="threengan",
        producer_version=__version__,
        doc_string=f"threengan {model.method} classifier; preprocessing: {PREPROCESSING}",
    )
    onnx_model.ir_version = 8  # what onnxruntime releases since 1.14 read
    helper.set_model_props(
        onnx_model, {META_KEY: json.dumps(metadata(model)), "preprocessing": PREPROCESSING}
    )
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def metadata(model: NumpyClassifier) -> dict[str, Any]:
    """What ``classify --checkpoint model.onnx`` and a deployer need besides the graph."""
    stats = model.stats
    return {
        "format": FORMAT,
        "source": model.model_id,
        "method": model.method,
        "classes": list(model.classes),
        "image_size": model.image_size,
        "fit": model.fit,
        "channels": 1,
        "normalisation": {"scale": model.scale, "offset": model.offset},
        "inputs": {"images": "uint8 (N, image_size, image_size), see preprocessing"},
        "temperature": stats.temperature if stats is not None else None,
        "ood_threshold": stats.threshold if stats is not None else None,
        "ood": stats.info if stats is not None else None,
        "threshold": model.stored_threshold,
        "decision": "two classes: the second when its probability is at least the threshold "
        "(0.5 unless 'threshold' holds one); more: the most probable",
    }


def export(model: NumpyClassifier, path: Path) -> int:
    """Write the graph to ``path`` whole or not at all; returns its size in bytes. Without
    the onnx package, or where ``path`` cannot be written, a :class:`Failure`."""
    try:
        data = build(model).SerializeToString()
    except ImportError:
        raise Failure(
            "export to ONNX needs the onnx package (pip install 'threengan[onnx]')"
        ) from None
    try:
        fileio.write_bytes(path, data)
    except OSError as exc:
        raise Failure(f"cannot write {path}: {exc.strerror or exc}") from None
    return len(data)


# ------------------------------------------------------------------------------ running
@dataclass(frozen=True)
class OnnxStats:
    """The part of a model's statistics that classify reads: the flag threshold."""

    threshold: float
    temperature: float
    info: dict[str, Any]


@dataclass
class OnnxClassifier(engine.Engine):
    """An exported classifier run by onnxruntime: what classify needs of an engine."""

    session: Any = field(repr=False)
    method: str
    classes: list[str]
    image_size: int
    fit: str
    model_id: str
    path: Path
    meta: dict[str, Any] = field(repr=False)
    stats: OnnxStats | None = None
    device: str = "cpu (onnxruntime)"

    @property
    def stored_threshold(self) -> dict[str, Any] | None:
        """The threshold ``evaluate --threshold-from`` stored in the source, if any."""
        found = {engine.THRESHOLD_KEY: self.meta.get("threshold")}
        return engine.stored_threshold(found, self.path)

    def require_classifier(self) -> None:
        """Loading already checked the graph's inputs and outputs."""

    def outputs_of(self, images_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        names = ["probabilities"] + (["ood_score"] if self.stats is not None else [])
        found = self.session.run(names, {"images": np.ascontiguousarray(images_u8)})
        return found[0], (found[1] if self.stats is not None else None)

    def explained_outputs(self, images_u8: np.ndarray) -> tuple[np.ndarray, Any, np.ndarray]:
        """Probabilities, scores and evidence maps (N, K, 4, 4) of one run of the graph."""
        names = ["probabilities", "evidence"] + (["ood_score"] if self.stats is not None else [])
        found = self.session.run(names, {"images": np.ascontiguousarray(images_u8)})
        return found[0], (found[2] if self.stats is not None else None), found[1]


def is_onnx(path: Path | None) -> bool:
    return path is not None and Path(path).suffix.lower() == SUFFIX


def load(path: Path) -> OnnxClassifier:
    """An exported model, checked against what classify needs; a :class:`ModelError`
    (``modelfile``) names what is wrong, and a missing onnxruntime says how to install it."""
    path = modelfile.checked_file(path)
    try:
        import onnxruntime
    except ImportError:
        raise modelfile.ModelError(
            f"{path} is an ONNX model: running it needs onnxruntime (pip install 'threengan[onnx]')"
        ) from None
    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers are not the user's
        session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        meta = json.loads(session.get_modelmeta().custom_metadata_map[META_KEY])
        classes, size = [str(c) for c in meta["classes"]], int(meta["image_size"])
        fit = str(meta["fit"])
    except Exception as exc:  # a damaged or foreign file: onnxruntime raises its own types
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise modelfile.ModelError(f"{path} is not a threengan ONNX export ({why[:200]})") from None
    names = {o.name for o in session.get_outputs()}
    if "probabilities" not in names or "evidence" not in names:
        raise modelfile.ModelError(f"{path} lacks the probabilities or evidence output")
    stats = None
    if "ood_score" in names and meta.get("ood_threshold") is not None:
        stats = OnnxStats(float(meta["ood_threshold"]), float(meta["temperature"]), {
            "ood": meta.get("ood") or {}
        })  # fmt: skip
    return OnnxClassifier(
        session=session,
        method=str(meta.get("method", "?")),
        classes=classes,
        image_size=size,
        fit=fit,
        model_id=modelfile.file_id(path),
        path=path,
        meta=meta,
        stats=stats,
    )
