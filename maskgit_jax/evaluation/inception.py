"""The FID Inception-v3 network (TensorFlow's 2015-12-05 graph) in Flax, and its weight loader.

FID, Inception Score and precision/recall are only comparable across papers when computed
with one fixed network: the Inception-v3 that TensorFlow published on 2015-12-05 as a frozen
GraphDef, `classify_image_graph_def.pb` inside

    http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz

(pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` is a conversion of the same graph).
`load_inception_params` reads the GraphDef's constant tensors (TensorFlow parses the file; the
graph is never run), checks every node this network needs (weight shapes, convolution strides
and padding, pooling types and sizes) and returns the parameter tree of `InceptionV3`, keyed
by the graph's own node names ("mixed_9/tower/mixed/conv", "softmax", ...). Either the .pb or
the whole .tgz may be given.

Differences from torchvision's Inception-v3 that the graph has (and pytorch-fid mirrors):
1008 output classes, average pools that do not count padding, and a max pool (not an average
pool) in the last block's pool branch. Outputs: "pool_3", the 2048-d features FID and
precision/recall use, and "logits", the 1008-way pre-softmax scores ("softmax/logits" in the
graph) the Inception Score uses. Class order of the logits: see `rejection.py`.

Input convention (pytorch-fid's): images float in [0, 1], NHWC, any size; resized to 299x299
with bilinear interpolation (half-pixel centres, no antialiasing) and mapped to [-1, 1] by
2x - 1. (The graph's own JPEG path computes (255x - 128) / 128, a 0.4% offset from this.)
"""

import dataclasses
import io
import tarfile
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from maskgit_jax import compile_options

Array = jax.Array

INCEPTION_URL = "http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz"
GRAPH_FILE = "classify_image_graph_def.pb"
LABEL_MAP_FILE = "imagenet_2012_challenge_label_map_proto.pbtxt"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
BATCHNORM_EPSILON = 1e-3

DOWNLOAD_HELP = (
    f"Download {INCEPTION_URL} (TensorFlow's 2015-12-05 Inception-v3, about 90 MB) and either "
    f"pass the .tgz itself or extract {GRAPH_FILE} from it (`tar xzf inception-2015-12-05.tgz "
    f"{GRAPH_FILE}`); nothing is downloaded at run time."
)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One convolution + batch norm + ReLU of the graph, named as in the graph."""

    name: str
    kernel: tuple[int, int]
    in_channels: int
    out_channels: int
    stride: int = 1
    padding: str = "SAME"


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """One pooling node of the graph: op "MaxPool" or "AvgPool"."""

    name: str
    op: str
    size: int
    stride: int
    padding: str


def _block_a(prefix: str, cin: int, pool_channels: int) -> list[ConvSpec]:
    return [
        ConvSpec(f"{prefix}/conv", (1, 1), cin, 64),
        ConvSpec(f"{prefix}/tower/conv", (1, 1), cin, 48),
        ConvSpec(f"{prefix}/tower/conv_1", (5, 5), 48, 64),
        ConvSpec(f"{prefix}/tower_1/conv", (1, 1), cin, 64),
        ConvSpec(f"{prefix}/tower_1/conv_1", (3, 3), 64, 96),
        ConvSpec(f"{prefix}/tower_1/conv_2", (3, 3), 96, 96),
        ConvSpec(f"{prefix}/tower_2/conv", (1, 1), cin, pool_channels),
    ]


def _block_b(prefix: str, cin: int) -> list[ConvSpec]:
    return [
        ConvSpec(f"{prefix}/conv", (3, 3), cin, 384, 2, "VALID"),
        ConvSpec(f"{prefix}/tower/conv", (1, 1), cin, 64),
        ConvSpec(f"{prefix}/tower/conv_1", (3, 3), 64, 96),
        ConvSpec(f"{prefix}/tower/conv_2", (3, 3), 96, 96, 2, "VALID"),
    ]


def _block_c(prefix: str, c7: int) -> list[ConvSpec]:
    return [
        ConvSpec(f"{prefix}/conv", (1, 1), 768, 192),
        ConvSpec(f"{prefix}/tower/conv", (1, 1), 768, c7),
        ConvSpec(f"{prefix}/tower/conv_1", (1, 7), c7, c7),
        ConvSpec(f"{prefix}/tower/conv_2", (7, 1), c7, 192),
        ConvSpec(f"{prefix}/tower_1/conv", (1, 1), 768, c7),
        ConvSpec(f"{prefix}/tower_1/conv_1", (7, 1), c7, c7),
        ConvSpec(f"{prefix}/tower_1/conv_2", (1, 7), c7, c7),
        ConvSpec(f"{prefix}/tower_1/conv_3", (7, 1), c7, c7),
        ConvSpec(f"{prefix}/tower_1/conv_4", (1, 7), c7, 192),
        ConvSpec(f"{prefix}/tower_2/conv", (1, 1), 768, 192),
    ]


def _block_d(prefix: str) -> list[ConvSpec]:
    return [
        ConvSpec(f"{prefix}/tower/conv", (1, 1), 768, 192),
        ConvSpec(f"{prefix}/tower/conv_1", (3, 3), 192, 320, 2, "VALID"),
        ConvSpec(f"{prefix}/tower_1/conv", (1, 1), 768, 192),
        ConvSpec(f"{prefix}/tower_1/conv_1", (1, 7), 192, 192),
        ConvSpec(f"{prefix}/tower_1/conv_2", (7, 1), 192, 192),
        ConvSpec(f"{prefix}/tower_1/conv_3", (3, 3), 192, 192, 2, "VALID"),
    ]


def _block_e(prefix: str, cin: int) -> list[ConvSpec]:
    return [
        ConvSpec(f"{prefix}/conv", (1, 1), cin, 320),
        ConvSpec(f"{prefix}/tower/conv", (1, 1), cin, 384),
        ConvSpec(f"{prefix}/tower/mixed/conv", (1, 3), 384, 384),
        ConvSpec(f"{prefix}/tower/mixed/conv_1", (3, 1), 384, 384),
        ConvSpec(f"{prefix}/tower_1/conv", (1, 1), cin, 448),
        ConvSpec(f"{prefix}/tower_1/conv_1", (3, 3), 448, 384),
        ConvSpec(f"{prefix}/tower_1/mixed/conv", (1, 3), 384, 384),
        ConvSpec(f"{prefix}/tower_1/mixed/conv_1", (3, 1), 384, 384),
        ConvSpec(f"{prefix}/tower_2/conv", (1, 1), cin, 192),
    ]


def conv_specs() -> list[ConvSpec]:
    """All 94 convolutions of the graph, in graph order."""
    return [
        ConvSpec("conv", (3, 3), 3, 32, 2, "VALID"),
        ConvSpec("conv_1", (3, 3), 32, 32, 1, "VALID"),
        ConvSpec("conv_2", (3, 3), 32, 64, 1, "SAME"),
        ConvSpec("conv_3", (1, 1), 64, 80, 1, "VALID"),
        ConvSpec("conv_4", (3, 3), 80, 192, 1, "VALID"),
        *_block_a("mixed", 192, 32),
        *_block_a("mixed_1", 256, 64),
        *_block_a("mixed_2", 288, 64),
        *_block_b("mixed_3", 288),
        *_block_c("mixed_4", 128),
        *_block_c("mixed_5", 160),
        *_block_c("mixed_6", 160),
        *_block_c("mixed_7", 192),
        *_block_d("mixed_8"),
        *_block_e("mixed_9", 1280),
        *_block_e("mixed_10", 2048),
    ]


def pool_specs() -> list[PoolSpec]:
    """All pooling nodes; "pool_3" is the final 8x8 average over the 8x8 grid at 299x299."""
    branch_pools = [
        PoolSpec(f"{block}/tower_2/pool", "AvgPool", 3, 1, "SAME")
        for block in ("mixed", "mixed_1", "mixed_2", "mixed_4", "mixed_5", "mixed_6", "mixed_7")
    ]
    return [
        PoolSpec("pool", "MaxPool", 3, 2, "VALID"),
        PoolSpec("pool_1", "MaxPool", 3, 2, "VALID"),
        *branch_pools,
        PoolSpec("mixed_3/pool", "MaxPool", 3, 2, "VALID"),
        PoolSpec("mixed_8/pool", "MaxPool", 3, 2, "VALID"),
        PoolSpec("mixed_9/tower_2/pool", "AvgPool", 3, 1, "SAME"),
        PoolSpec("mixed_10/tower_2/pool", "MaxPool", 3, 1, "SAME"),
        PoolSpec("pool_3", "AvgPool", 8, 1, "VALID"),
    ]


_CONVS = {spec.name: spec for spec in conv_specs()}
_POOLS = {spec.name: spec for spec in pool_specs()}


class ConvBN(nn.Module):
    """Convolution (no bias), inference batch norm, ReLU; parameters named as in the graph."""

    spec: ConvSpec
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: Array) -> Array:
        spec = self.spec
        kernel = self.param(
            "conv2d_params",
            nn.initializers.lecun_normal(),
            (*spec.kernel, spec.in_channels, spec.out_channels),
        )
        channels = (spec.out_channels,)
        beta = self.param("beta", nn.initializers.zeros, channels)
        gamma = self.param("gamma", nn.initializers.ones, channels)
        mean = self.param("moving_mean", nn.initializers.zeros, channels)
        variance = self.param("moving_variance", nn.initializers.ones, channels)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            (spec.stride, spec.stride),
            spec.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision,
        )
        y = (y - mean) * (gamma * jax.lax.rsqrt(variance + BATCHNORM_EPSILON)) + beta
        return nn.relu(y)


def _pool(name: str, x: Array) -> Array:
    spec = _POOLS[name]
    window, strides = (spec.size, spec.size), (spec.stride, spec.stride)
    if spec.op == "MaxPool":
        return nn.max_pool(x, window, strides, spec.padding)
    # TensorFlow's SAME average pooling divides by the number of in-image elements.
    return nn.avg_pool(x, window, strides, spec.padding, count_include_pad=False)


class InceptionV3(nn.Module):
    """The FID Inception-v3; `__call__` returns {"pool_3": [B, 2048], "logits": [B, 1008]}.

    Parameters: `{"params": load_inception_params(path)}`. Inputs of another size than 299
    are resized unless `preprocessed=True`, in which case they must already be 299x299 in
    [-1, 1].
    """

    precision: Any = jax.lax.Precision.HIGHEST

    def _conv(self, name: str, x: Array) -> Array:
        return ConvBN(_CONVS[name], self.precision, name=name)(x)

    def _block_a(self, prefix: str, x: Array) -> Array:
        conv = self._conv
        b0 = conv(f"{prefix}/conv", x)
        b1 = conv(f"{prefix}/tower/conv_1", conv(f"{prefix}/tower/conv", x))
        b2 = conv(f"{prefix}/tower_1/conv", x)
        b2 = conv(f"{prefix}/tower_1/conv_2", conv(f"{prefix}/tower_1/conv_1", b2))
        b3 = conv(f"{prefix}/tower_2/conv", _pool(f"{prefix}/tower_2/pool", x))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)

    def _block_b(self, prefix: str, x: Array) -> Array:
        conv = self._conv
        b0 = conv(f"{prefix}/conv", x)
        b1 = conv(f"{prefix}/tower/conv_1", conv(f"{prefix}/tower/conv", x))
        b1 = conv(f"{prefix}/tower/conv_2", b1)
        return jnp.concatenate([b0, b1, _pool(f"{prefix}/pool", x)], axis=-1)

    def _block_c(self, prefix: str, x: Array) -> Array:
        conv = self._conv
        b0 = conv(f"{prefix}/conv", x)
        b1 = x
        for name in ("tower/conv", "tower/conv_1", "tower/conv_2"):
            b1 = conv(f"{prefix}/{name}", b1)
        b2 = x
        for name in ("conv", "conv_1", "conv_2", "conv_3", "conv_4"):
            b2 = conv(f"{prefix}/tower_1/{name}", b2)
        b3 = conv(f"{prefix}/tower_2/conv", _pool(f"{prefix}/tower_2/pool", x))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)

    def _block_d(self, prefix: str, x: Array) -> Array:
        conv = self._conv
        b0 = conv(f"{prefix}/tower/conv_1", conv(f"{prefix}/tower/conv", x))
        b1 = x
        for name in ("conv", "conv_1", "conv_2", "conv_3"):
            b1 = conv(f"{prefix}/tower_1/{name}", b1)
        return jnp.concatenate([b0, b1, _pool(f"{prefix}/pool", x)], axis=-1)

    def _block_e(self, prefix: str, x: Array) -> Array:
        conv = self._conv

        def split(tower: str, y: Array) -> Array:
            first = conv(f"{prefix}/{tower}/mixed/conv", y)
            second = conv(f"{prefix}/{tower}/mixed/conv_1", y)
            return jnp.concatenate([first, second], axis=-1)

        b0 = conv(f"{prefix}/conv", x)
        b1 = split("tower", conv(f"{prefix}/tower/conv", x))
        b2 = conv(f"{prefix}/tower_1/conv_1", conv(f"{prefix}/tower_1/conv", x))
        b2 = split("tower_1", b2)
        b3 = conv(f"{prefix}/tower_2/conv", _pool(f"{prefix}/tower_2/pool", x))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)

    @nn.compact
    def __call__(self, images: Array, *, preprocessed: bool = False) -> dict[str, Array]:
        x = images if preprocessed else preprocess(images)
        for name in ("conv", "conv_1", "conv_2"):
            x = self._conv(name, x)
        x = _pool("pool", x)
        x = self._conv("conv_4", self._conv("conv_3", x))
        x = _pool("pool_1", x)
        for prefix in ("mixed", "mixed_1", "mixed_2"):
            x = self._block_a(prefix, x)
        x = self._block_b("mixed_3", x)
        for prefix in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
            x = self._block_c(prefix, x)
        x = self._block_d("mixed_8", x)
        x = self._block_e("mixed_9", x)
        x = self._block_e("mixed_10", x)
        # pool_3: the 8x8 average pool over the whole 8x8 grid of a 299x299 input.
        features = jnp.mean(x, axis=(1, 2))
        weights = self.param(
            "softmax/weights", nn.initializers.lecun_normal(), (FEATURE_DIM, NUM_LOGITS)
        )
        biases = self.param("softmax/biases", nn.initializers.zeros, (NUM_LOGITS,))
        logits = jnp.dot(features, weights, precision=self.precision) + biases
        return {"pool_3": features, "logits": logits}


def preprocess(images: Array, size: int = INPUT_SIZE) -> Array:
    """[B, H, W, C] in [0, 1] (C = 1 or 3) -> [B, size, size, 3] in [-1, 1] (bilinear resize)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [B, H, W, 1 or 3]; got shape {images.shape}.")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


# ----------------------------------------------------------------------------- weight loading


def check_file(path: str | epath.PathLike) -> epath.Path:
    """`path` as a Path; a missing file is a FileNotFoundError saying where to get it."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Inception weights not found at {path}. {DOWNLOAD_HELP}")
    return path


def _read_graph_bytes(path: epath.Path) -> bytes:
    data = check_file(path).read_bytes()
    if path.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            member = next(
                (m for m in archive.getmembers() if m.name.split("/")[-1] == GRAPH_FILE), None
            )
            if member is None:
                raise FileNotFoundError(f"{path} holds no {GRAPH_FILE}. {DOWNLOAD_HELP}")
            return archive.extractfile(member).read()
    return data


def read_graph_def(path: str | epath.PathLike) -> Any:
    """Parses a frozen GraphDef (.pb, or the .tgz holding it) with TensorFlow; runs nothing."""
    import tensorflow as tf  # Only the loader needs TensorFlow.

    path = epath.Path(path)
    data = _read_graph_bytes(path)
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError, a bare Exception subclass
        raise ValueError(f"{path} is not a TensorFlow GraphDef ({e}). {DOWNLOAD_HELP}") from e
    return graph_def


class _Graph:
    """Name lookup over a GraphDef's nodes with errors that name the node and the file."""

    def __init__(self, graph_def: Any, source: str):
        self.nodes = {node.name: node for node in graph_def.node}
        self.source = source

    def node(self, name: str, ops: Sequence[str]) -> Any:
        node = self.nodes.get(name)
        if node is None:
            raise ValueError(
                f"node {name!r} not found in {self.source}: it is not the 2015-12-05 FID "
                f"Inception graph ({GRAPH_FILE}). {DOWNLOAD_HELP}"
            )
        if node.op not in ops:
            raise ValueError(f"node {name!r} in {self.source} is a {node.op}, expected {ops}.")
        return node

    def const(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        import tensorflow as tf

        value = tf.make_ndarray(self.node(name, ("Const",)).attr["value"].tensor)
        if value.shape != shape:
            raise ValueError(
                f"node {name!r} in {self.source} has shape {value.shape}, expected {shape}."
            )
        return value.astype(np.float32)

    def check_attr(self, node: Any, key: str, expected: Any, read: Callable[[Any], Any]) -> None:
        if key not in node.attr:
            raise ValueError(f"node {node.name!r} in {self.source} has no attribute {key!r}.")
        found = read(node.attr[key])
        if found != expected:
            raise ValueError(
                f"node {node.name!r} in {self.source} has {key}={found!r}, expected {expected!r}."
            )


def _ints(attr: Any) -> list[int]:
    return list(attr.list.i)


def _string(attr: Any) -> str:
    return attr.s.decode()


def _conv_params(graph: _Graph, spec: ConvSpec) -> dict[str, np.ndarray]:
    name = spec.name
    kernel = graph.const(
        f"{name}/conv2d_params", (*spec.kernel, spec.in_channels, spec.out_channels)
    )
    conv = graph.node(f"{name}/Conv2D", ("Conv2D",))
    graph.check_attr(conv, "strides", [1, spec.stride, spec.stride, 1], _ints)
    if spec.kernel != (1, 1):  # padding is immaterial for 1x1 kernels
        graph.check_attr(conv, "padding", spec.padding, _string)
    norm = graph.node(f"{name}/batchnorm", ("BatchNormWithGlobalNormalization",))
    channels = (spec.out_channels,)
    params = {
        "conv2d_params": kernel,
        **{
            key: graph.const(f"{name}/batchnorm/{key}", channels)
            for key in ("beta", "gamma", "moving_mean", "moving_variance")
        },
    }
    if not norm.attr["scale_after_normalization"].b:
        params["gamma"] = np.ones(channels, np.float32)
    # Fold the graph's epsilon into the variance, so that ours (1e-3) gives the same result.
    epsilon = norm.attr["variance_epsilon"].f if "variance_epsilon" in norm.attr else 0.0
    params["moving_variance"] = (
        params["moving_variance"].astype(np.float64) + epsilon - BATCHNORM_EPSILON
    ).astype(np.float32)
    return params


def load_inception_params(path: str | epath.PathLike) -> dict[str, Any]:
    """Reads the 2015-12-05 graph (.pb or .tgz) into `InceptionV3`'s parameter tree.

    Every node the network needs is checked (constant shapes, convolution strides and
    padding, pooling op, window, strides and padding); the first mismatch or missing node is
    named in a ValueError. A missing file raises FileNotFoundError saying where to get it.
    """
    path = epath.Path(path)
    graph = _Graph(read_graph_def(path), str(path))
    params: dict[str, Any] = {spec.name: _conv_params(graph, spec) for spec in conv_specs()}
    for spec in pool_specs():
        node = graph.node(spec.name, (spec.op,))
        graph.check_attr(node, "ksize", [1, spec.size, spec.size, 1], _ints)
        if spec.name != "pool_3":  # one window over the whole grid: its stride is immaterial
            graph.check_attr(node, "strides", [1, spec.stride, spec.stride, 1], _ints)
        graph.check_attr(node, "padding", spec.padding, _string)
    params["softmax/weights"] = graph.const("softmax/weights", (FEATURE_DIM, NUM_LOGITS))
    params["softmax/biases"] = graph.const("softmax/biases", (NUM_LOGITS,))
    return params


def abstract_params() -> dict[str, Any]:
    """The parameter tree's shapes and dtypes, without computing anything."""
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: InceptionV3().init(jax.random.PRNGKey(0), x, preprocessed=True), images
    )
    return variables["params"]


def make_apply_fn(
    params: dict[str, Any],
    mesh: jax.sharding.Mesh | None = None,
    precision: Any = jax.lax.Precision.HIGHEST,
) -> Callable[[Any], dict[str, np.ndarray]]:
    """A jitted images [B, H, W, C] in [0, 1] -> {"pool_3", "logits"} numpy function.

    With `mesh`, the parameters are replicated over it and the batch is split over all its
    axes (a batch that does not divide evenly is padded, and the padding dropped). Device
    arrays whose batch divides evenly are resharded on the devices, not copied to the host.
    Compiled with float32's `compile_options.forward_options`: on CPU, XLA's own convolutions
    run the network about twice as fast as YNNPACK's (13 -> 26 images/s at batch 8).
    """
    model = InceptionV3(precision)
    platform = mesh.devices.flat[0].platform if mesh is not None else None
    apply = jax.jit(
        lambda p, x: model.apply({"params": p}, x),
        compiler_options=compile_options.forward_options(jnp.float32, platform),
    )
    in_sharding = None
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        in_sharding = jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names))
        )
        params = jax.device_put(params, replicated)
    else:
        params = jax.device_put(params)

    def run(images: Any) -> dict[str, np.ndarray]:
        on_device = isinstance(images, jax.Array)
        if on_device and (in_sharding is None or images.shape[0] % mesh.size == 0):
            # Images already on the devices (a sampler's output) stay there.
            n = images.shape[0]
            x = jax.device_put(images, in_sharding) if in_sharding is not None else images
        else:
            x = np.asarray(images, np.float32)
            n = x.shape[0]
            if in_sharding is not None:
                padded = -(-n // mesh.size) * mesh.size
                if padded != n:
                    x = np.concatenate([x, np.repeat(x[-1:], padded - n, axis=0)])
                x = jax.device_put(x, in_sharding)
        out = apply(params, x)
        return {key: np.asarray(value)[:n] for key, value in out.items()}

    return run
