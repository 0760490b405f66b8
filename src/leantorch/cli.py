"""The ``leantorch`` command: thin argument parsing over the library.

    leantorch profile MODEL [--input SHAPE ... | --seq-len N] [--batch B] [--depth D] [--json]
                            [--backward] [--train] [--runs N] [--warmup N] [--threads T]
                            [--device cpu|cuda] [--device-spec auto|measure|none|NAME]
                            [--no-latency]
    leantorch models

Errors in what the user typed end the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from leantorch.errors import LeanError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leantorch", description="Make PyTorch models cheaper and prove it.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "profile", help="what a model costs: FLOPs, MACs, params, bytes, memory, latency",
        description="Count what a model costs per module. MODEL is a built-in name (see "
        "'leantorch models'), a local transformers model folder, or path/to/file.py:factory.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--input", action="append", metavar="SHAPE", dest="shapes",
                   help="an input's shape without the batch dimension, e.g. 3x224x224 or "
                   "128:int64; repeat for several inputs")
    p.add_argument("--seq-len", type=int, metavar="N", help="sequence length of a text model")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--depth", type=int, default=2, metavar="D",
                   help="module tree depth shown (default 2; the JSON has every module)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--backward", action="store_true", help="also count the backward pass")
    p.add_argument("--train", action="store_true", help="run in training mode (default eval)")
    p.add_argument("--runs", type=int, default=10, help="timed runs (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up runs (default 3)")
    p.add_argument("--threads", type=int, metavar="T", help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="run on this device (default cpu)")
    p.add_argument("--device-spec", default="auto", metavar="SPEC",
                   help="roofline device: auto (measured here, or a known GPU's datasheet), "
                   "measure, none, or a datasheet name such as h100-sxm")
    p.add_argument("--no-latency", action="store_true", help="skip timing")

    sub.add_parser("models", help="list the built-in model names")
    return parser


def _profile(args: argparse.Namespace) -> int:
    import torch

    from leantorch.measure import profile
    from leantorch.measure.roofline import DATASHEETS
    from leantorch.models import load_model

    if args.depth < 0:
        raise LeanError(f"--depth must be >= 0, got {args.depth}")
    spec = None if args.device_spec.lower() == "none" else args.device_spec
    if spec is not None and spec.lower() not in ("auto", "measure", *DATASHEETS):
        raise LeanError(f"--device-spec {args.device_spec!r} is not known; accepted: auto, "
                        f"measure, none, {', '.join(sorted(DATASHEETS))}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise LeanError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1...)"
                        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LeanError(f"--device {args.device}: CUDA is not available on this machine")
    loaded = load_model(args.model)
    inputs, kwargs = loaded.example_inputs(batch=args.batch, seq_len=args.seq_len,
                                           shapes=args.shapes)
    model = loaded.model.to(device)
    inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    report = profile(model, *inputs, input_kwargs=kwargs, backward=args.backward,
                     train=args.train, latency=not args.no_latency, runs=args.runs,
                     warmup=args.warmup, threads=args.threads, device_spec=spec)
    report.model = f"{loaded.name} ({report.model})"
    if args.json:
        print(report.to_json())
        return 0
    try:
        from leantorch.measure.render import render_rich

        render_rich(report, depth=args.depth)
    except ImportError:
        print(report.table(depth=args.depth))
    return 0


def _models() -> int:
    from leantorch.models import BUILTINS

    width = max(map(len, BUILTINS))
    for name, (description, _) in BUILTINS.items():
        print(f"{name.ljust(width)}  {description}")
    print("\nAlso accepted: a local transformers model folder, or path/to/file.py:factory.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "profile":
            return _profile(args)
        return _models()
    except LeanError as error:
        print(f"leantorch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
