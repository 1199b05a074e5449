"""Shared fixtures. Each area adds its own section; never rewrite another area's fixtures."""

from __future__ import annotations

import os

import numpy as np
import pytest

# ---------------------------------------------------------------------------------------------
# Runtime: small but real stage bundles (real ONNX files, real manifest) + a numpy reference
# ---------------------------------------------------------------------------------------------


class ToyBundle:
    """A bundle of tiny MLP stages that follows the stage contract, and its numpy twin.

    stage 0: input [N,3,S,S] -> Flatten -> MatMul+Add -> Relu -> features [N,D]
    stage k: Gather(features, keep_idx) -> MatMul+Add -> Relu -> features
    every stage: features -> MatMul+Add -> logits; confidence = ReduceMax(Softmax); prediction = Cast(ArgMax, int32)
    """

    def __init__(self, path, weights, num_stages, classes, size, features_dtype):
        self.path = str(path)
        self.weights = weights  # per stage: (W_trunk, b_trunk, W_head, b_head)
        self.num_stages = num_stages
        self.classes = classes
        self.size = size
        self.features_dtype = np.dtype(features_dtype)

    def inputs(self, n: int, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).normal(size=(n, 3, self.size, self.size)).astype(np.float32)

    def reference(self, x: np.ndarray) -> list[dict]:
        """Every stage on every sample, float32 numpy (the graphs' arithmetic)."""
        out = []
        h = x.reshape(x.shape[0], int(np.prod(x.shape[1:]))).astype(np.float32)
        for k, (wt, bt, wh, bh) in enumerate(self.weights):
            h = np.maximum(h @ wt + bt, 0).astype(np.float32)
            if k < self.num_stages - 1:
                h = h.astype(self.features_dtype).astype(np.float32)
            logits = (h @ wh + bh).astype(np.float32)
            z = np.exp(logits - logits.max(axis=1, keepdims=True))
            p = z / z.sum(axis=1, keepdims=True)
            out.append({"logits": logits, "confidence": p.max(axis=1).astype(np.float32),
                        "prediction": logits.argmax(axis=1).astype(np.int32), "features": h})
        return out

    def early_exit(self, x: np.ndarray, thresholds) -> dict:
        """Reference early-exit result: exit at the first k < K-1 with confidence >= thresholds[k]."""
        ref = self.reference(x)
        n = x.shape[0]
        exit_stage = np.full(n, self.num_stages - 1, np.int32)
        done = np.zeros(n, bool)
        for k, t in enumerate(thresholds):
            now = ~done & (ref[k]["confidence"] >= t)
            exit_stage[now] = k
            done |= now
        rows = np.arange(n)
        pick = lambda name: np.stack([r[name] for r in ref])[exit_stage, rows]  # noqa: E731
        return {"exit_stage": exit_stage, "prediction": pick("prediction").astype(np.int64),
                "confidence": pick("confidence"), "logits": np.stack([r["logits"] for r in ref])[exit_stage, rows],
                "all": ref}


def _toy_stage_model(k, K, wt, bt, wh, bh, size, features_dtype):
    from onnx import TensorProto, helper, numpy_helper

    fdt = TensorProto.FLOAT16 if np.dtype(features_dtype) == np.float16 else TensorProto.FLOAT
    D, C = wt.shape[1], wh.shape[1]
    inits = [numpy_helper.from_array(a, n) for a, n in ((wt, "Wt"), (bt, "bt"), (wh, "Wh"), (bh, "bh"))]
    nodes = []
    if k == 0:
        inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])]
        nodes.append(helper.make_node("Flatten", ["input"], ["flat"], axis=1))
        src = "flat"
    else:
        # ONNX forbids an input and an output of one name, so the features input is renamed (found by role).
        inputs = [helper.make_tensor_value_info("features_in", fdt, ["batch_in", wt.shape[0]]),
                  helper.make_tensor_value_info("keep_idx", TensorProto.INT32, ["batch"])]
        nodes.append(helper.make_node("Gather", ["features_in", "keep_idx"], ["gathered"], axis=0))
        src = "gathered"
        if fdt == TensorProto.FLOAT16:
            nodes.append(helper.make_node("Cast", ["gathered"], ["gathered32"], to=TensorProto.FLOAT))
            src = "gathered32"
    nodes += [helper.make_node("MatMul", [src, "Wt"], ["mm"]), helper.make_node("Add", ["mm", "bt"], ["pre"]),
              helper.make_node("Relu", ["pre"], ["h"])]
    last = k == K - 1
    head_src = "h"
    outputs = []
    if not last:
        if fdt == TensorProto.FLOAT16:
            nodes.append(helper.make_node("Cast", ["h"], ["features"], to=TensorProto.FLOAT16))
            nodes.append(helper.make_node("Cast", ["features"], ["h_round"], to=TensorProto.FLOAT))
            head_src = "h_round"
        else:
            nodes.append(helper.make_node("Identity", ["h"], ["features"]))
        outputs.append(helper.make_tensor_value_info("features", fdt, ["batch", D]))
    nodes += [helper.make_node("MatMul", [head_src, "Wh"], ["lm"]), helper.make_node("Add", ["lm", "bh"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
              helper.make_node("ReduceMax", ["prob"], ["confidence"], axes=[1], keepdims=0),
              helper.make_node("ArgMax", ["logits"], ["am"], axis=1, keepdims=0),
              helper.make_node("Cast", ["am"], ["prediction"], to=TensorProto.INT32)]
    outputs += [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", C]),
                helper.make_tensor_value_info("confidence", TensorProto.FLOAT, ["batch"]),
                helper.make_tensor_value_info("prediction", TensorProto.INT32, ["batch"])]
    graph = helper.make_graph(nodes, f"toy_stage_{k}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="dmpo-edge-tests")
    model.ir_version = 8
    return model


def write_toy_bundle(path, num_stages=3, classes=4, seed=0, hidden=16, size=8, max_batch=64, thresholds=None,
                     cpu_variant=False, features_dtype="float32", scale=1.0):
    """Write a toy bundle at ``path`` and return its :class:`ToyBundle` (see the class doc)."""
    import onnx

    from dmpo_edge.bundle import REGROUP_KEEP_IDX, SCHEMA_VERSION, sha256_file, write_json_atomic
    from dmpo_edge.preprocess import Preprocess

    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    n_in = 3 * size * size
    names = [f"class_{i}" for i in range(classes)]
    weights, stages, cum = [], [], 0.0
    fdt = np.dtype(features_dtype).name
    for k in range(num_stages):
        d_in = n_in if k == 0 else hidden
        wt = (rng.normal(size=(d_in, hidden)) * np.sqrt(2.0 / d_in)).astype(np.float32)
        bt = (rng.normal(size=hidden) * 0.1).astype(np.float32)
        # Deeper heads are sharper, so confidences spread over (1/C, 1) and grow with depth.
        wh = (rng.normal(size=(hidden, classes)) * scale * (0.6 + 0.5 * k)).astype(np.float32)
        bh = (rng.normal(size=classes) * 0.1).astype(np.float32)
        weights.append((wt, bt, wh, bh))
        model = _toy_stage_model(k, num_stages, wt, bt, wh, bh, size, features_dtype)
        fname = f"stage_{k}.onnx"
        onnx.save(model, os.path.join(path, fname))
        flops = 2.0 * (d_in * hidden + hidden * classes)
        cum += flops
        ins = ([{"name": "input", "shape": ["batch", 3, size, size], "dtype": "float32"}] if k == 0 else
               [{"name": "features_in", "shape": ["batch_in", hidden], "dtype": fdt},
                {"name": "keep_idx", "shape": ["batch"], "dtype": "int32"}])
        outs = ([{"name": "features", "shape": ["batch", hidden], "dtype": fdt}] if k < num_stages - 1 else []) + [
            {"name": "logits", "shape": ["batch", classes], "dtype": "float32"},
            {"name": "confidence", "shape": ["batch"], "dtype": "float32"},
            {"name": "prediction", "shape": ["batch"], "dtype": "int32"}]
        st = {"index": k, "file": fname, "sha256": sha256_file(os.path.join(path, fname)), "inputs": ins,
              "outputs": outs, "flops": flops, "cumulative_flops": cum}
        if cpu_variant:
            vname = f"stage_{k}.cpu.onnx"
            model.graph.name = f"toy_stage_{k}_cpu"
            onnx.save(model, os.path.join(path, vname))
            st["variants"] = {"cpu": {"file": vname, "sha256": sha256_file(os.path.join(path, vname))}}
        stages.append(st)
    pre = Preprocess(resize=size, crop=size, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)).to_dict()
    manifest = {
        "format": "dmpo-edge-bundle", "schema_version": SCHEMA_VERSION,
        "model": {"name": "toy", "backbone": "mlp", "classes": names, "num_classes": classes,
                  "config": {"hidden": hidden, "seed": seed}},
        "preprocess": pre, "precision": {"mode": "fp16" if fdt == "float16" else "fp32"},
        "regroup": REGROUP_KEEP_IDX, "max_batch": max_batch, "exit_policy": "max_softmax", "stages": stages,
    }
    if thresholds is not None:
        manifest["thresholds"] = {"values": [float(t) for t in thresholds], "method": "fixed", "target": None}
    write_json_atomic(os.path.join(path, "manifest.json"), manifest)
    return ToyBundle(path, weights, num_stages, classes, size, features_dtype)


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory):
    """Factory: ``toy_bundle(num_stages=3, classes=4, seed=0, **kw) -> ToyBundle`` (cached per argument set)."""
    cache = {}

    def make(num_stages=3, classes=4, seed=0, **kw):
        key = (num_stages, classes, seed, tuple(sorted(kw.items(), key=lambda i: i[0])))
        key = repr(key)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"toy_bundle_{num_stages}s_{classes}c_{seed}")
            cache[key] = write_toy_bundle(path, num_stages=num_stages, classes=classes, seed=seed, **kw)
        return cache[key]

    return make


# ---------------------------------------------------------------------------------------------
# Compile: a tiny DMPO checkpoint whose exits really classify digits, and bundles compiled from it
# ---------------------------------------------------------------------------------------------

TINY_IMAGE = 32


def _fit_exit_classifiers(model, x, y, num_classes: int, scale: float = 8.0) -> list:
    """Fit the last Linear of every exit by ridge regression on what it sees (seconds, not minutes of training).

    The trunk and the bypass / covariance parts keep their random weights; the exits still separate digits
    well above chance, which is what the precision tests need (an accuracy that INT8 could visibly lose).
    """
    import torch

    accs = []
    with torch.no_grad():
        feats = torch.from_numpy(x)
        for k in range(model.num_stages):
            feats = model.forward_stage(k, feats)
            calls = []
            hooks = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, inp[0])))
                     for m in model.modules() if isinstance(m, torch.nn.Linear)]
            try:
                model.forward_exit(k, feats)
            finally:
                for h in hooks:
                    h.remove()
            fc, inp = calls[-1]
            X = torch.cat([inp.reshape(inp.shape[0], -1).double(), torch.ones(inp.shape[0], 1, dtype=torch.float64)], 1)
            Y = torch.nn.functional.one_hot(torch.from_numpy(y), num_classes).double()
            G = X.T @ X
            ridge = 1e-3 * float(torch.trace(G)) / G.shape[0]  # relative ridge: well-conditioned, moderate weights
            W = torch.linalg.solve(G + ridge * torch.eye(G.shape[0], dtype=torch.float64), X.T @ Y) * scale
            fc.weight.copy_(W[:-1].T.float())
            fc.bias.copy_(W[-1].float())
            accs.append(float((model.forward_exit(k, feats).argmax(1).numpy() == y).mean()))
    return accs


#: EfficientNet-Lite0 with its shipped ImageNet weights at 32 x 32: a real pre-trained trunk (realistic activation
#: ranges for INT8) that costs a few MFLOPs per image; 4 exits, covariance heads on the early ones
TINY_CONFIG = {"backbone": "efficientnet_lite0", "image_size": TINY_IMAGE, "num_classes": 10, "cov_dim": 16,
               "bypass_dim": 16, "adapter_dim": 8}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A dmpo-edge model.pt (:data:`TINY_CONFIG`) whose exits are fitted on 600 digits:train images."""
    torch = pytest.importorskip("torch")
    from dmpo_edge.calib.datasets import load_dataset
    from dmpo_edge.models import build_model, save_checkpoint
    from dmpo_edge.models.flops import stage_flops
    from dmpo_edge.preprocess import Preprocess

    torch.manual_seed(0)
    model = build_model(dict(TINY_CONFIG)).eval()
    pre = Preprocess(resize=TINY_IMAGE, crop=TINY_IMAGE)
    train = load_dataset("digits:train").take(600)
    accs = _fit_exit_classifiers(model, pre(train.images), train.labels, 10)
    metrics = {"exit_accuracy": accs, "train_data": "digits:train", **stage_flops(model, TINY_IMAGE)}
    path = tmp_path_factory.mktemp("tiny_ckpt") / "tiny_model.pt"
    save_checkpoint(str(path), model, classes=train.classes, preprocess=pre.to_dict(), loss_schedule={},
                    metrics=metrics)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bundle_factory(tmp_path_factory, tiny_checkpoint):
    """Factory: ``tiny_bundle_factory(precision="fp32", **compile_bundle_options) -> Bundle`` compiled from
    :func:`tiny_checkpoint` with calibration on digits:train and held-out digits:test (cached per arguments)."""
    cache = {}

    def make(precision="fp32", **kw):
        from dmpo_edge.compile import compile_bundle

        # accept_drop: the test model's ridge-fitted exits have near-ties that INT8 noise flips (see the tests);
        # the sensitivity report that an accepted miss brings has its own (slow) test
        opts = {"calib": "digits:train", "calib_count": 64, "holdout": "digits:test", "exporter": "torchscript",
                "progress": False, "build": "never", "accept_drop": True, "sensitivity": False}
        opts.update(kw)
        key = repr((precision, sorted(opts.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny_{precision}") / "bundle"
            cache[key] = compile_bundle(tiny_checkpoint, str(out), precision=precision, **opts)
        return cache[key]

    return make


# ---------------------------------------------------------------------------------------------
# Named data sets: a tiny checkpoint fitted on any labelled spec (fashion-mnist for the demo)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_checkpoint_for(tmp_path):
    """``make(spec) -> model.pt`` (:data:`TINY_CONFIG`) whose exits are ridge-fitted on ``spec``'s images."""

    def make(spec: str, count: int = 600) -> str:
        torch = pytest.importorskip("torch")
        from dmpo_edge.calib.datasets import load_dataset
        from dmpo_edge.models import build_model, save_checkpoint
        from dmpo_edge.models.flops import stage_flops
        from dmpo_edge.preprocess import Preprocess

        torch.manual_seed(0)
        model = build_model(dict(TINY_CONFIG)).eval()
        pre = Preprocess(resize=TINY_IMAGE, crop=TINY_IMAGE)
        train = load_dataset(spec)
        train = train.stratified_take(min(count, len(train)))
        accs = _fit_exit_classifiers(model, pre(train.images), train.labels, len(train.classes))
        path = tmp_path / "tiny_named_model.pt"
        save_checkpoint(str(path), model, classes=train.classes, preprocess=pre.to_dict(), loss_schedule={},
                        metrics={"exit_accuracy": accs, "train_data": spec, **stage_flops(model, TINY_IMAGE)})
        return str(path)

    return make
