"""Trainers behind the train step: each fits a seeded classifier on (n, F) float32 rows
(images flattened from (H, W, C)) and exports ONNX with the same two outputs, `label`
(int64 class index into `classes`) and `probabilities` (float32 [N, K]), and input
`input`: [N, F], or for the image CNNs (torch, keras with `image_shape`) the image tensor
[N, H, W, C] as image clients send it (the gateway also takes such an input's rows
flattened, [N, H*W*C]). Each also returns the framework's own predictions on the holdout,
so the evaluate step can refuse an export that disagrees with it.

- `sklearn` (default): a small MLP (scikit-learn, skl2onnx)
- `sklearn-gbt`: gradient boosting (HistGradientBoostingClassifier, skl2onnx)
- `xgboost` (extra `xgboost`): XGBClassifier, onnxmltools
- `torch` (extra `torch`): a small CNN for images (`image_shape` given), else an MLP;
  torch.onnx
- `keras` (extra `tensorflow`): a small Keras CNN (images) or MLP, saved as a TensorFlow
  SavedModel (returned as `saved_model.zip`) and converted from it with tf2onnx
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]


@dataclass
class Fitted:
    onnx: bytes
    #: the framework's own predictions on the holdout rows
    labels: Array
    probabilities: Array
    #: extra files to keep as artifacts (name -> bytes), e.g. a SavedModel
    files: dict[str, bytes] = field(default_factory=dict)
    train_accuracy: float = 0.0
    #: warnings raised while training (distinct messages)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Data:
    x: Array
    y: Array  # class indices 0..K-1
    holdout: Array
    classes: int
    #: (H, W, C) when the rows are flattened images
    image_shape: tuple[int, int, int] | None = None
    #: neural nets train on rows / scale (about [0, 1]); their ONNX graph divides by it
    scale: float = 1.0


def _sklearn(model: Any, data: Data) -> Fitted:
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    model.fit(data.x, data.y)
    options = {id(model): {"zipmap": False}}
    if hasattr(model, "steps"):
        options = {id(model.steps[-1][1]): {"zipmap": False}}
    with warnings.catch_warnings():
        # skl2onnx's tree converters hand protobuf booleans for int lists (protobuf warns
        # that 7.34 will refuse them; the models are correct, the export check shows it)
        warnings.filterwarnings(
            "ignore", "Field onnx.AttributeProto.ints: Expected an int", DeprecationWarning
        )
        proto = to_onnx(
            model,
            initial_types=[("input", FloatTensorType([None, data.x.shape[1]]))],
            options=options,
            target_opset=17,
        )
    return Fitted(
        onnx=proto.SerializeToString(),
        labels=model.predict(data.holdout),
        probabilities=model.predict_proba(data.holdout).astype(np.float32),
        train_accuracy=float(model.score(data.x, data.y)),
    )


def sklearn_mlp(data: Data, seed: int, params: dict[str, Any]) -> Fitted:
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    hidden = tuple(int(h) for h in params.get("hidden", [64]))
    mlp = MLPClassifier(
        hidden_layer_sizes=hidden, max_iter=int(params.get("max_iter", 300)), random_state=seed
    )
    return _sklearn(Pipeline([("scale", StandardScaler()), ("mlp", mlp)]), data)


def sklearn_gbt(data: Data, seed: int, params: dict[str, Any]) -> Fitted:
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(
        max_iter=int(params.get("max_iter", 100)), random_state=seed, early_stopping=False
    )
    return _sklearn(model, data)


def xgboost(data: Data, seed: int, params: dict[str, Any]) -> Fitted:
    import onnxmltools
    from onnxmltools.convert.common.data_types import FloatTensorType
    from xgboost import XGBClassifier

    model = XGBClassifier(
        n_estimators=int(params.get("n_estimators", 100)),
        max_depth=int(params.get("max_depth", 4)),
        learning_rate=float(params.get("learning_rate", 0.3)),
        random_state=seed,
        n_jobs=1,
        tree_method="hist",
    )
    model.fit(data.x, data.y)
    proto = onnxmltools.convert_xgboost(
        model,
        initial_types=[("input", FloatTensorType([None, data.x.shape[1]]))],
        target_opset=15,  # the highest onnxmltools' XGBoost converter supports
    )
    _rename_outputs(proto, ["label", "probabilities"])
    return Fitted(
        onnx=proto.SerializeToString(),
        labels=model.predict(data.holdout).astype(np.int64),
        probabilities=model.predict_proba(data.holdout).astype(np.float32),
        train_accuracy=float((model.predict(data.x) == data.y).mean()),
    )


def _rename_outputs(proto: Any, names: list[str]) -> None:
    """Give the graph's outputs these names (and every use of the old ones)."""
    renames = {out.name: new for out, new in zip(proto.graph.output, names, strict=True)}
    for node in proto.graph.node:
        node.output[:] = [renames.get(o, o) for o in node.output]
        node.input[:] = [renames.get(i, i) for i in node.input]
    for out in proto.graph.output:
        out.name = renames[out.name]


def torch_net(data: Data, seed: int, params: dict[str, Any]) -> Fitted:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(params.get("threads", 1)))
    features = data.x.shape[1]
    shape = data.image_shape

    class Net(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            if shape is not None:
                height, width, channels = shape
                self.body: nn.Module = nn.Sequential(
                    nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                    nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), 64), nn.ReLU(),
                    nn.Linear(64, data.classes),
                )  # fmt: skip
            else:
                self.body = nn.Sequential(
                    nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, data.classes)
                )

        def forward(self, x: Any) -> Any:
            if shape is not None:
                height, width, channels = shape
                x = x.reshape(-1, height, width, channels).permute(0, 3, 1, 2)
            return self.body(x)

    class Exported(nn.Module):  # type: ignore[misc]
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x: Any) -> tuple[Any, Any]:
            probabilities = torch.softmax(self.net(x), dim=1)
            return torch.argmax(probabilities, dim=1), probabilities

    net = Net()
    optimizer = torch.optim.Adam(net.parameters(), lr=float(params.get("lr", 0.003)))
    x = torch.from_numpy(_scaled(data.x, data.scale))
    y = torch.from_numpy(data.y.astype(np.int64))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(int(params.get("epochs", 15))):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            batch = order[start : start + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    exported = Exported(net).eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter: deterministic and enough for these graphs (the
        # torch.export one needs onnxscript); it and its internals warn that it is legacy
        warnings.simplefilter("ignore", DeprecationWarning)
        example = x[:2] if shape is None else x[:2].reshape(-1, *shape)  # images: [N, H, W, C]
        torch.onnx.export(
            exported,
            (example,),
            buffer,
            input_names=["input"],
            output_names=["label", "probabilities"],
            dynamic_axes={"input": {0: "N"}, "label": {0: "N"}, "probabilities": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
        labels, probabilities = exported(torch.from_numpy(_scaled(data.holdout, data.scale)))
        train_labels, _ = exported(x)
    return Fitted(
        onnx=_with_scaling(buffer.getvalue(), data.scale),
        labels=labels.numpy().astype(np.int64),
        probabilities=probabilities.numpy().astype(np.float32),
        train_accuracy=float((train_labels.numpy() == data.y).mean()),
    )


def _scaled(x: Array, scale: float) -> npt.NDArray[np.float32]:
    return (np.asarray(x, dtype=np.float32) / np.float32(scale)).astype(np.float32)


def _with_scaling(model: bytes, factor: float) -> bytes:
    """Prefix the graph with input / factor, so the exported model takes raw rows."""
    import onnx
    from onnx import helper, numpy_helper

    if factor == 1.0:
        return model
    proto = onnx.load_from_string(model)
    graph = proto.graph
    scaled = "input_scaled"
    for node in graph.node:
        node.input[:] = [scaled if i == "input" else i for i in node.input]
    graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "input_factor"))
    graph.node.insert(0, helper.make_node("Div", ["input", "input_factor"], [scaled]))
    scaled_model: bytes = proto.SerializeToString()
    return scaled_model


def keras_net(data: Data, seed: int, params: dict[str, Any]) -> Fitted:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx

    tf.keras.backend.clear_session()  # layer names restart: the same run, the same bytes
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    shape = data.image_shape
    layers = tf.keras.layers
    # images: the model takes [N, H, W, C] (its rows are reshaped to it here)
    row_shape = (data.x.shape[1],) if shape is None else tuple(shape)
    inputs = tf.keras.Input(shape=row_shape, name="input")
    if shape is not None:
        hidden = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
        hidden = layers.MaxPooling2D(2)(hidden)
        hidden = layers.Conv2D(32, 3, padding="same", activation="relu")(hidden)
        hidden = layers.MaxPooling2D(2)(hidden)
        hidden = layers.Flatten()(hidden)
        hidden = layers.Dense(64, activation="relu")(hidden)
    else:
        hidden = layers.Dense(64, activation="relu")(inputs)
    outputs = layers.Dense(data.classes, activation="softmax", name="probabilities")(hidden)
    model = tf.keras.Model(inputs, outputs)
    model.compile(optimizer=tf.keras.optimizers.Adam(float(params.get("lr", 0.003))),
                  loss="sparse_categorical_crossentropy")  # fmt: skip
    x = _scaled(data.x, data.scale).reshape(-1, *row_shape)
    holdout_x = _scaled(data.holdout, data.scale).reshape(-1, *row_shape)
    model.fit(x, data.y, epochs=int(params.get("epochs", 15)), batch_size=64, verbose=0,
              shuffle=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="servo-savedmodel-") as tmp:
        saved = Path(tmp) / "saved_model"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
            for path in sorted(saved.rglob("*")):
                if path.is_file():
                    zipped.write(path, path.relative_to(saved).as_posix())
        loaded = tf.saved_model.load(str(saved))  # ONNX from the SavedModel, not the model
        signature = loaded.signatures["serving_default"]
        (output_key,) = signature.structured_outputs
        spec = tf.TensorSpec([None, *row_shape], tf.float32, name="input")

        @tf.function(input_signature=[spec])  # type: ignore[untyped-decorator]
        def serve(rows: Any) -> Any:
            return signature(input=rows)[output_key]

        proto, _ = tf2onnx.convert.from_function(serve, input_signature=[spec], opset=17)
    _rename_outputs(proto, ["probabilities"])
    _add_argmax(proto)
    holdout = model.predict(holdout_x, verbose=0).astype(np.float32)
    train = model.predict(x, verbose=0)
    return Fitted(
        onnx=_with_scaling(proto.SerializeToString(), data.scale),
        labels=holdout.argmax(axis=1).astype(np.int64),
        probabilities=holdout,
        files={"saved_model.zip": archive.getvalue()},
        train_accuracy=float((train.argmax(axis=1) == data.y).mean()),
    )


def _add_argmax(proto: Any) -> None:
    """Add the `label` output: ArgMax over `probabilities`."""
    from onnx import TensorProto, helper

    graph = proto.graph
    graph.node.append(helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0))
    label = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    graph.output.insert(0, label)


TRAINERS: dict[str, Callable[[Data, int, dict[str, Any]], Fitted]] = {
    "sklearn": sklearn_mlp,
    "sklearn-gbt": sklearn_gbt,
    "xgboost": xgboost,
    "torch": torch_net,
    "keras": keras_net,
}


def fit(framework: str, data: Data, seed: int, params: dict[str, Any]) -> Fitted:
    trainer = TRAINERS.get(framework)
    if trainer is None:
        raise ValueError(f"unknown framework {framework!r} ({', '.join(TRAINERS)})")
    with warnings.catch_warnings(record=True) as caught:
        # a trainer's warnings (e.g. scikit-learn's ConvergenceWarning) are part of the
        # run's record, not an error: the evaluation decides whether the model is good
        warnings.simplefilter("always")
        fitted = trainer(data, seed, params)
    fitted.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    fitted.onnx = _stable(fitted.onnx)
    return fitted


def _stable(model: bytes) -> bytes:
    """Names some converters make up per export (onnxmltools: a random graph name;
    tf2onnx: numbered dims and a log) made every export different bytes; fixed ones keep a
    seeded run's model byte-identical, so the registry can tell it is the same model."""
    import onnx

    proto = onnx.load_from_string(model)
    proto.graph.name = "servo"
    proto.graph.doc_string = ""  # tf2onnx: the conversion's log
    for value in [*proto.graph.input, *proto.graph.output]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:  # tf2onnx numbers unknown dims per process ("unk__11")
                dim.dim_param = "N"
    stable: bytes = proto.SerializeToString()
    return stable
