"""``dmpo-edge eval BUNDLE --data DATA [--json OUT] [--plot OUT.png]``.

Per-exit ("anytime") accuracy, the accuracy-versus-expected-FLOPs curve over the budgeted-batch sweep
(thresholds from the bundle's calibration split, applied to this data) and the operating point (the
manifest's thresholds on this data), all measured with the deployed stage graphs.
"""

from __future__ import annotations

__all__ = ["add_arguments", "run"]


def add_arguments(p) -> None:
    from .options import add_backend, add_batch_size, add_bundle, add_data, add_json_report, add_quiet

    add_bundle(p)
    add_data(p, what="labelled test data", split="test", required=True)
    add_json_report(p, what="evaluation report")
    p.add_argument("--plot", metavar="OUT.png", help="write the accuracy-versus-FLOPs plot (PNG) to OUT.png")
    add_batch_size(p)
    add_backend(p)
    add_quiet(p)


def run(args) -> int:
    from ..bundle import Bundle
    from ..calib.evaluate import evaluate
    from ..policies import format_thresholds
    from .calibrate import print_curve, print_exits, print_point, write_report
    from .options import checked_backend

    bundle = Bundle.load(args.bundle)
    backend = checked_backend(args.backend, bundle, where="eval")
    report = evaluate(bundle, args.data, batch_size=args.batch_size, backend=backend, progress=not args.quiet)
    data = report["data"]
    print(f"evaluated {bundle.path} ({report['precision']}, policy {report['policy']}) on {data['source']} "
          f"({data['size']} samples, backend {backend}); full model {report['full_flops'] / 1e6:.3f} MFLOPs/sample")
    print_exits(report["exits"])
    print_curve(report["curve"]["points"], f"accuracy versus expected FLOPs (thresholds from {report['curve']['thresholds_from']}):")
    op = report["operating_point"]
    if op is None:
        print("operating point: the bundle has no thresholds yet (run 'dmpo-edge calibrate')")
    else:
        print(f"operating point ({op.get('method') or op['thresholds_from']}, target {op.get('target')}), thresholds "
              + format_thresholds(op["thresholds"]))
        print_point("  on this data", op)
        if op.get("validation_accuracy") is not None:
            print(f"  on the calibration split: accuracy {100 * op['validation_accuracy']:.1f}%, "
                  f"cost {100 * op['validation_cost']:.1f}% of full FLOPs")
    if args.json:
        write_report(args.json, report)
        print(f"wrote {args.json}")
    if args.plot:
        from ..calib.plots import plot_evaluation

        plot_evaluation(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
