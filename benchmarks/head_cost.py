"""What stage 0's exit head costs in time, against its share of the FLOPs: the stage graph of a bundle timed whole
and cut at its ``features`` output (the trunk alone), interleaved in one process, ONNX Runtime on the CPU.

The covariance head of a DMPO exit (1x1 reduction, covariance pooling, Newton-Schulz square root, linear) is small
in FLOPs but made of many small matrix products, which run fewer FLOPs per second than the trunk's convolutions;
this measures by how much. Run from the repository root::

    python benchmarks/head_cost.py out/bench_digits/digits_fp32 [--threads 2] [--rounds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def _session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # interleaved: no spinning into the next call
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--batches", default="1,32")
    args = ap.parse_args(argv)
    import onnx
    from onnx.utils import Extractor

    with open(os.path.join(args.bundle, "manifest.json")) as f:
        stage = json.load(f)["stages"][0]
    path = os.path.join(args.bundle, stage["file"])
    model = onnx.load(path)
    inputs = [i.name for i in model.graph.input]
    with tempfile.TemporaryDirectory() as tmp:
        trunk_path = os.path.join(tmp, "trunk.onnx")
        onnx.save(Extractor(model).extract_model(inputs, ["features"]), trunk_path)
        full, trunk = _session(path, args.threads), _session(trunk_path, args.threads)
        dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
        print(f"{path}: head {100 * stage['head_flops'] / stage['flops']:.1f}% of the stage's FLOPs "
              f"({stage['head_flops'] / 1e6:.2f} of {stage['flops'] / 1e6:.2f} MFLOPs per image); load {os.getloadavg()[0]:.2f}")
        for b in (int(v) for v in args.batches.split(",")):
            feeds = {inputs[0]: np.random.default_rng(0).standard_normal([b] + dims[1:]).astype(np.float32)}
            times = {"stage": [], "trunk": []}
            full.run(None, feeds), trunk.run(None, feeds)
            for _ in range(args.rounds):
                for name, s in (("stage", full), ("trunk", trunk)):
                    t = time.perf_counter()
                    s.run(None, feeds)
                    times[name].append((time.perf_counter() - t) * 1e3)
            st, tr = float(np.median(times["stage"])), float(np.median(times["trunk"]))
            print(f"batch {b}: stage {st:.3f} ms, trunk alone {tr:.3f} ms, head {st - tr:.3f} ms = "
                  f"{100 * (st - tr) / st:.0f}% of the stage's time (median of {args.rounds}, {args.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
