"""A synthetic FID Inception graph: the 2015-12-05 graph's architecture, random weights.

The GraphDef has the real graph's node names, ops, shapes and attributes
(BatchNormWithGlobalNormalization at GraphDef producer version 5, as in the 2015-12-05
file), so `inception.load_inception_params` reads it like the real one: tests get an
Inception file offline. The graph is wired block by block; shapes, strides and padding come
from `inception.conv_specs()` / `pool_specs()`.
"""

import functools

import numpy as np

from maskgit_jax.evaluation import inception


class _GraphBuilder:
    """Writes GraphDef nodes the way the 2015-12-05 graph names and types them."""

    def __init__(self, tf, seed: int):
        self.tf = tf
        self.graph_def = tf.compat.v1.GraphDef()
        self.graph_def.versions.producer = 5  # BatchNormWithGlobalNormalization predates v9
        self.rng = np.random.default_rng(seed)
        self.convs = {s.name: s for s in inception.conv_specs()}
        self.pools = {s.name: s for s in inception.pool_specs()}
        self.float = tf.float32

    def node(self, name, op, inputs=(), **attrs):
        node = self.graph_def.node.add()
        node.name, node.op = name, op
        node.input.extend(inputs)
        for key, value in attrs.items():
            if isinstance(value, bool):
                node.attr[key].b = value
            elif isinstance(value, float):
                node.attr[key].f = value
            elif isinstance(value, str):
                node.attr[key].s = value.encode()
            elif isinstance(value, list):
                node.attr[key].list.i.extend(value)
            elif isinstance(value, int):
                node.attr[key].i = value
            else:
                node.attr[key].type = value.as_datatype_enum
        return name

    def const(self, name, value):
        node = self.graph_def.node.add()
        node.name, node.op = name, "Const"
        node.attr["dtype"].type = self.tf.as_dtype(value.dtype).as_datatype_enum
        node.attr["value"].tensor.CopyFrom(self.tf.make_tensor_proto(value))
        return name

    def conv(self, name, x):
        spec = self.convs[name]
        kh, kw = spec.kernel
        fan_in = kh * kw * spec.in_channels
        shape = (kh, kw, spec.in_channels, spec.out_channels)
        kernel = self.rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        c = spec.out_channels
        bn = {
            "beta": self.rng.normal(0, 0.1, c),
            "gamma": self.rng.uniform(0.6, 1.4, c),
            "moving_mean": self.rng.normal(0, 0.1, c),
            "moving_variance": self.rng.uniform(0.6, 1.4, c),
        }
        stride = [1, spec.stride, spec.stride, 1]
        y = self.node(
            f"{name}/Conv2D",
            "Conv2D",
            [x, self.const(f"{name}/conv2d_params", kernel)],
            T=self.float,
            strides=stride,
            padding=spec.padding,
        )
        inputs = [y] + [
            self.const(f"{name}/batchnorm/{k}", bn[k].astype(np.float32))
            for k in ("moving_mean", "moving_variance", "beta", "gamma")
        ]
        y = self.node(
            f"{name}/batchnorm",
            "BatchNormWithGlobalNormalization",
            inputs,
            T=self.float,
            variance_epsilon=0.001,
            scale_after_normalization=True,
        )
        return self.node(name, "Relu", [y], T=self.float)

    def pool(self, name, x):
        spec = self.pools[name]
        return self.node(
            name,
            spec.op,
            [x],
            T=self.float,
            ksize=[1, spec.size, spec.size, 1],
            strides=[1, spec.stride, spec.stride, 1],
            padding=spec.padding,
        )

    def join(self, name, inputs):
        dim = self.const(f"{name}/concat_dim", np.array(3, np.int32))
        return self.node(name, "Concat", [dim, *inputs], T=self.float, N=len(inputs))


def build_graph(tf):
    """The full-architecture graph with random weights (seed 0), as a GraphDef."""
    g = _GraphBuilder(tf, seed=0)
    x = g.node("Mul", "Placeholder", dtype=g.float)
    for name in ("conv", "conv_1", "conv_2"):
        x = g.conv(name, x)
    x = g.pool("pool", x)
    x = g.pool("pool_1", g.conv("conv_4", g.conv("conv_3", x)))
    for p in ("mixed", "mixed_1", "mixed_2"):
        t1 = g.conv(f"{p}/tower/conv_1", g.conv(f"{p}/tower/conv", x))
        t2 = g.conv(f"{p}/tower_1/conv_1", g.conv(f"{p}/tower_1/conv", x))
        t2 = g.conv(f"{p}/tower_1/conv_2", t2)
        t3 = g.conv(f"{p}/tower_2/conv", g.pool(f"{p}/tower_2/pool", x))
        x = g.join(f"{p}/join", [g.conv(f"{p}/conv", x), t1, t2, t3])
    t1 = g.conv("mixed_3/tower/conv_1", g.conv("mixed_3/tower/conv", x))
    t1 = g.conv("mixed_3/tower/conv_2", t1)
    x = g.join("mixed_3/join", [g.conv("mixed_3/conv", x), t1, g.pool("mixed_3/pool", x)])
    for p in ("mixed_4", "mixed_5", "mixed_6", "mixed_7"):
        t1 = x
        for n in ("conv", "conv_1", "conv_2"):
            t1 = g.conv(f"{p}/tower/{n}", t1)
        t2 = x
        for n in ("conv", "conv_1", "conv_2", "conv_3", "conv_4"):
            t2 = g.conv(f"{p}/tower_1/{n}", t2)
        t3 = g.conv(f"{p}/tower_2/conv", g.pool(f"{p}/tower_2/pool", x))
        x = g.join(f"{p}/join", [g.conv(f"{p}/conv", x), t1, t2, t3])
    t1 = g.conv("mixed_8/tower/conv_1", g.conv("mixed_8/tower/conv", x))
    t2 = x
    for n in ("conv", "conv_1", "conv_2", "conv_3"):
        t2 = g.conv(f"mixed_8/tower_1/{n}", t2)
    x = g.join("mixed_8/join", [t1, t2, g.pool("mixed_8/pool", x)])
    for p in ("mixed_9", "mixed_10"):
        t1 = g.conv(f"{p}/tower/conv", x)
        t1 = g.join(
            f"{p}/tower/mixed",
            [g.conv(f"{p}/tower/mixed/conv", t1), g.conv(f"{p}/tower/mixed/conv_1", t1)],
        )
        t2 = g.conv(f"{p}/tower_1/conv_1", g.conv(f"{p}/tower_1/conv", x))
        t2 = g.join(
            f"{p}/tower_1/mixed",
            [g.conv(f"{p}/tower_1/mixed/conv", t2), g.conv(f"{p}/tower_1/mixed/conv_1", t2)],
        )
        t3 = g.conv(f"{p}/tower_2/conv", g.pool(f"{p}/tower_2/pool", x))
        x = g.join(f"{p}/join", [g.conv(f"{p}/conv", x), t1, t2, t3])
    x = g.pool("pool_3", x)
    shape = g.const("pool_3/_reshape/shape", np.array([-1, 2048], np.int32))
    x = g.node("pool_3/_reshape", "Reshape", [x, shape], T=g.float, Tshape=tf.int32)
    weights = g.rng.normal(0, 0.02, (2048, 1008)).astype(np.float32)
    biases = g.rng.normal(0, 0.1, 1008).astype(np.float32)
    w = g.const("softmax/weights", weights)
    y = g.node("softmax/logits/MatMul", "MatMul", [x, w], T=g.float)
    y = g.node("softmax/logits", "BiasAdd", [y, g.const("softmax/biases", biases)], T=g.float)
    g.node("softmax", "Softmax", [y], T=g.float)
    return g.graph_def


@functools.cache
def graph_bytes() -> bytes:
    """The serialized synthetic graph (built once per process; needs TensorFlow)."""
    import tensorflow as tf

    return build_graph(tf).SerializeToString()


def write_graph(directory) -> str:
    """Writes the synthetic graph as `classify_image_graph_def.pb` in `directory`."""
    import pathlib

    path = pathlib.Path(directory) / inception.GRAPH_FILE
    path.write_bytes(graph_bytes())
    return str(path)
