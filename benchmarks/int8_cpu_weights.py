"""The INT8 CPU form's weight scheme on this CPU: full S8, 7-bit S8 (``reduce_range``) or U8 (U8U8 kernels).

Per stage (the stage alone, its input the FP32 features of the stage before), each scheme is quantized with ONNX
Runtime's ``quantize_static`` (QDQ, U8 activations, MinMax on digits:train) and compared with the FP32 stage by
top-1 agreement on digits:test, run twice: with this host's integer kernels and with Q/DQ simulated in float. Where
the two differ the kernels saturate (x86 without VNNI: ``vpmaddubsw`` adds U8 x S8 pairs in 16 bits); compile picks
its CPU-form schemes from :func:`dmpo_edge.compile.int8.cpu_weight_schemes` accordingly.

Run from the repository root (``uptime`` is printed with the figures)::

    python benchmarks/int8_cpu_weights.py --model out/digits_model.pt [--stages 0,3] [--calib 64] [--test 150]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="out/digits_model.pt")
    ap.add_argument("--stages", default="", help="comma-separated stage indices (default: all)")
    ap.add_argument("--calib", type=int, default=64, help="calibration images from digits:train")
    ap.add_argument("--test", type=int, default=150, help="digits:test images compared")
    args = ap.parse_args(argv)

    from dmpo_edge.bundle import Bundle
    from dmpo_edge.calib.datasets import load_dataset
    from dmpo_edge.compile import compile_bundle
    from dmpo_edge.compile.graph import ensure_node_names, load_model
    from dmpo_edge.compile.int8 import CPU_WEIGHT_SCHEMES, batched_feeds, image_layer_nodes, quantize_cpu_form
    from dmpo_edge.compile.onnxrun import run_chain, session
    from dmpo_edge.cpu_isa import detect

    print(f"host: {dict(detect())}; load average {[round(v, 2) for v in os.getloadavg()]}")
    with tempfile.TemporaryDirectory(prefix="int8-cpu-weights-") as work:
        out = os.path.join(work, "fp32")
        compile_bundle(args.model, out, precision="fp32", progress=False, build="never", log=lambda m: None)
        b = Bundle.load(out)
        paths = [b.stage_path(k) for k in range(b.num_stages)]
        xc = b.preprocess(load_dataset("digits:train").take(args.calib).images)
        xt = b.preprocess(load_dataset("digits:test").take(args.test, seed=1).images)
        cc, ct = run_chain(paths, xc, collect_inputs=True), run_chain(paths, xt, collect_inputs=True)

        def feeds(chain, k):
            f = chain[k]["input"]
            return batched_feeds({"input": f} if k == 0 else
                                 {"features_in": f, "keep_idx": np.arange(len(f), dtype=np.int32)}, 32)

        stages = [int(s) for s in args.stages.split(",") if s] or list(range(b.num_stages))
        for k in stages:
            # the image layer stays FP32 in the CPU form (as compile does)
            keep = image_layer_nodes(ensure_node_names(load_model(paths[0]))) if k == 0 else []
            ref = session(paths[k])
            for w in CPU_WEIGHT_SCHEMES:
                dst = os.path.join(work, f"s{k}.{w}.onnx")
                quantize_cpu_form(paths[k], dst, feeds(cc, k), keep, "QDQ", "max", w)
                agree = []
                for sim in (False, True):
                    s = session(dst, simulate_qdq=sim)
                    agree.append(float(np.mean(np.concatenate([s.run(["prediction"], f)[0] == ref.run(["prediction"], f)[0]
                                                               for f in feeds(ct, k)]))))
                print(f"stage {k} weights {w:>7}: top-1 agreement with FP32 {100 * agree[0]:.1f}% with this host's "
                      f"kernels, {100 * agree[1]:.1f}% with Q/DQ simulated ({len(xt)} images)", flush=True)
    print(f"load average {[round(v, 2) for v in os.getloadavg()]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
