"""``dmpo-edge run BUNDLE --source URI``: classify frames with early exits, print each and a summary.

Examples::

    dmpo-edge run out/digits_int8 --source frames/            # a folder, lossless
    dmpo-edge run out/digits_int8 --source clip.mp4 --json    # JSON lines, one per frame, then the summary
    dmpo-edge run out/digits_int8 --source 0 --realtime       # camera 0, drop stale frames
    dmpo-edge run out/digits_int8 --source "gst:videotestsrc num-buffers=100"
"""

from __future__ import annotations

import json
import sys

from ..errors import DmpoEdgeError


def add_arguments(p) -> None:
    from .options import add_backend, add_bundle, add_in_flight, add_json_lines, add_quiet, add_thresholds

    add_bundle(p)
    p.add_argument("--source", required=True,
                   help="image folder, image or video file, camera index or /dev/videoN, URL, or GStreamer pipeline (gst:...)")
    add_backend(p, allow_null=True)
    p.add_argument("--batch", type=int, default=None, help="frames per micro-batch (default: min(8, max batch))")
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="longest wait to fill a micro-batch (default: 20)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--realtime", dest="realtime", action="store_true", default=None,
                      help="drop stale frames when behind (default for cameras and live pipelines)")
    mode.add_argument("--lossless", dest="realtime", action="store_false",
                      help="classify every frame (default for folders and files)")
    p.add_argument("--limit", type=int, default=None, help="stop after N frames")
    add_thresholds(p)
    add_in_flight(p, what="micro-batches")
    p.add_argument("--width", type=int, default=None, help="camera / GStreamer frame width")
    p.add_argument("--height", type=int, default=None, help="camera / GStreamer frame height")
    p.add_argument("--skip-bad", action="store_true", help="skip images that cannot be decoded instead of stopping")
    p.add_argument("--max-file-mb", type=float, default=None, metavar="MB",
                   help="largest image file read from a folder (default 256; checked before decoding)")
    p.add_argument("--max-megapixels", type=float, default=None, metavar="MP",
                   help="largest image (width x height) decoded from a folder (default 50; checked from the header)")
    add_json_lines(p, what="JSON lines (one per frame, then a summary line)")
    add_quiet(p, what="print the summary only")


def _thresholds(text):
    from ..runtime.bench import parse_float_list

    return None if text is None else parse_float_list(text, "--thresholds", where="run")


def _print_summary(s: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"summary": s}), flush=True)
        return
    lat = s["latency_ms"]
    exits = ", ".join(f"{k}:{c}" for k, c in enumerate(s["exit_counts"]))
    print(f"summary: {s['frames_classified']} frames classified ({s['frames_read']} read, {s['frames_dropped']} dropped, "
          f"{s['mode']}) in {s['elapsed_s']:.2f} s = {s['fps']} FPS on {s['backend']}")
    print(f"  latency ms: mean {lat['mean']:.1f}  p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}")
    from ..policies import format_thresholds

    th = format_thresholds(s["thresholds"]) if s.get("thresholds") is not None else "none"
    print(f"  exits per stage: {exits}  (ideal speed-up {s['ideal_speedup']}x, thresholds {th})")
    if "accuracy" in s:
        print(f"  accuracy on {s['labelled']} labelled frames: {s['accuracy']:.4f}")
    if s.get("skipped"):
        from ..terminal import printable

        why = s.get("skip_reasons") or [""]
        print(f"  skipped {len(s['skipped'])} unreadable image(s), first: {printable(s['skipped'][0])} ({printable(why[0])})")
    if s.get("ignored"):
        from ..terminal import printable

        print(f"  ignored {len(s['ignored'])} file(s) that are not images by name (GIF, video, other), first: "
              f"{printable(s['ignored'][0])}")
    sys.stdout.flush()


def run(args) -> int:
    from ..runtime.checks import check_float
    from ..runtime.stream import stream
    from ..terminal import printable
    from .options import checked_backend

    backend = checked_backend(args.backend, where="run", allow_null=True)
    max_bytes = None if args.max_file_mb is None else int(check_float(args.max_file_mb, "--max-file-mb", "run", 1e-3, 1e6) * 2**20)
    max_pixels = (None if args.max_megapixels is None
                  else int(check_float(args.max_megapixels, "--max-megapixels", "run", 1e-3, 1e5) * 1e6))
    st = stream(args.bundle, args.source, batch=args.batch, max_wait_ms=args.max_wait_ms, realtime=args.realtime,
                limit=args.limit, backend=backend, thresholds=_thresholds(args.thresholds),
                max_in_flight=args.max_in_flight, width=args.width, height=args.height, skip_bad=args.skip_bad,
                max_file_bytes=max_bytes, max_pixels=max_pixels)
    err = None
    n = 0
    try:
        for r in st:
            n += 1
            if args.quiet:
                continue
            if args.json:  # ensure_ascii escapes control characters; undecodable names are shown escaped
                print(json.dumps({**r.as_dict(), "name": printable(r.name)}), flush=False)
            else:
                truth = "" if r.truth is None else f"  truth {printable(r.truth)}"
                print(f"{r.index:6d}  {printable(r.name):<28.28s} {printable(r.label):<12.12s} conf {r.confidence:.3f}  exit {r.exit_stage}  "
                      f"{r.latency_ms:7.1f} ms{truth}")
            if n % 64 == 0:
                sys.stdout.flush()
    except DmpoEdgeError as exc:
        err = exc  # the source failed: every finished frame was printed; say so after the summary
    except KeyboardInterrupt:
        err = None
    _print_summary(st.summary(), args.json)
    if err is not None:
        raise err
    return 0
