"""The ``leantorch`` command: thin argument parsing over the library.

    leantorch profile MODEL [--input SHAPE ... | --seq-len N] [--batch B] [--depth D] [--json]
                            [--backward] [--train] [--runs N] [--warmup N] [--threads T]
                            [--device cpu|cuda] [--device-spec auto|measure|none|NAME]
                            [--no-latency]
    leantorch profile --hardware [--threads T] [--json]
    leantorch compress MODEL --recipe RECIPE [--data FILE] [--out DIR] [--overwrite]
                             [--seq-len N] [--input SHAPE ...] [--threads T]
                             [--latency-runs N] [--json]
    leantorch models
    leantorch recipes
    leantorch transforms [NAME ...] [--json]

Errors in what the user typed end the command with one line on stderr
(``leantorch: error: ...``) and exit status 2; everything that can be checked without the model
(recipe, data file, output folder, shapes) is checked before the model loads. Ctrl-C prints
``leantorch: interrupted`` and exits with 130. ``compress`` builds its output folder in a
temporary sibling and renames it into place, so the folder is complete or absent.
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
        "'leantorch models'), a local transformers model folder, a folder written by "
        "'leantorch compress', or path/to/file.py:factory. With --hardware (and no MODEL): "
        "this machine's CPU, matrix features, matmul kernel paths and measured peaks.")
    p.add_argument("model", metavar="MODEL", nargs="?")
    p.add_argument("--hardware", action="store_true",
                   help="instead of a model: the CPU, its matrix features (VNNI, AVX512-BF16, "
                   "AMX), which kernel fp32/bf16/fp16/int8 matmuls take, and their measured "
                   "throughput (about a second)")
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

    c = sub.add_parser(
        "compress", help="apply a recipe (transforms, fine-tune, verification) to a model",
        description="Compress MODEL with RECIPE, print a before/after table per step and "
        "write the model (model.safetensors), report.json and report.md to --out. Nothing is "
        "written when a verification gate fails (exit status 1). MODEL is read as by "
        "'leantorch profile', so a folder an earlier compress wrote can be compressed again.")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--recipe", required=True, metavar="RECIPE",
                   help="a shipped recipe name (see 'leantorch recipes') or a .yaml file")
    c.add_argument("--data", metavar="FILE",
                   help="calibration and evaluation texts, one per line (default: the bundled "
                   "sentences)")
    c.add_argument("--out", metavar="DIR", help="output folder (default out/MODEL-RECIPE); "
                   "written complete or not at all")
    c.add_argument("--overwrite", action="store_true",
                   help="replace --out if it exists and is not empty (default: refuse)")
    c.add_argument("--seq-len", type=int, metavar="N", help="override the recipe's seq_len")
    c.add_argument("--input", action="append", metavar="SHAPE", dest="shapes",
                   help="for a model without a tokenizer or known inputs: an input's shape "
                   "without the batch dimension (random calibration inputs); repeatable")
    c.add_argument("--threads", type=int, metavar="T", help="torch threads (default: torch's)")
    c.add_argument("--latency-runs", type=int, default=10, metavar="N",
                   help="interleaved timing rounds, each timing every stage once (default 10; "
                   "0 skips timing)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")

    sub.add_parser("models", help="list the built-in model names")
    sub.add_parser("recipes", help="list the shipped recipes")
    t = sub.add_parser(
        "transforms", help="list the registered transforms and their knobs",
        description="List every registered transform (the names a recipe step uses) with the "
        "arguments it takes: annotation, default and what each does.")
    t.add_argument("names", nargs="*", metavar="NAME",
                   help="only these transforms; a family (quant, prune, ...) selects all of it")
    t.add_argument("--json", action="store_true", help="print them as JSON")
    return parser


def _hardware(args: argparse.Namespace) -> int:
    import json

    import torch

    from leantorch.measure.hardware import machine_info, machine_summary, matrix_peaks

    if args.model is not None:
        raise LeanError(f"--hardware describes this machine and takes no MODEL, got "
                        f"{args.model!r}")
    if args.threads is not None:
        if args.threads < 1:
            raise LeanError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    info = machine_info()
    peaks = matrix_peaks(("float32", "bfloat16", "float16", "int8"), size=1024, seconds=1.0)
    if args.json:
        print(json.dumps({"machine": info, "matrix_peaks": peaks}, indent=2))
        return 0
    print(machine_summary(info))
    onednn = info["kernel_paths"]["onednn"]
    print(f"oneDNN {onednn['version'] or '(version not reported)'}: "
          f"{onednn['isa'] or 'ISA not reported'}" if onednn["available"] else
          "oneDNN: not built into this torch")
    print(f"{'dtype':<9} {'library':<8} {'unit':<13} {'implementation':<36} "
          f"{'GFLOP/s':>9} {'vs fp32':>8}")
    for dtype, peak in peaks["peaks"].items():
        path = info["kernel_paths"][dtype]
        ratio = peak["speedup_vs_float32"]
        print(f"{dtype:<9} {path['library']:<8} {path['unit'] or '?':<13} "
              f"{path['implementation'] or '-':<36} {peak['ops_per_second'] / 1e9:>9.1f} "
              f"{'-' if ratio is None else f'{ratio:.2f}x':>8}")
    print(f"{peaks['size']}^3 matmuls (int8: torch._int_mm, GOP/s), {peaks['rounds']} "
          f"interleaved rounds, {peaks['threads']} thread(s)")
    return 0


def _profile(args: argparse.Namespace) -> int:
    import torch

    from leantorch.measure import profile

    if args.hardware:
        return _hardware(args)
    if args.model is None:
        raise LeanError("profile needs a MODEL (see 'leantorch models'), or --hardware to "
                        "describe this machine")
    from leantorch.measure.roofline import DATASHEETS
    from leantorch.models import load_model
    from leantorch.models.registry import parse_shape

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
    if device.type == "meta":
        # the meta device runs no kernels: a latency or a measured peak would be made up
        if not args.no_latency:
            raise LeanError("--device meta runs no kernels, so a latency would be meaningless; "
                            "add --no-latency to count FLOPs, params and bytes only")
        if spec is not None and spec.lower() in ("auto", "measure"):
            raise LeanError(f"--device-spec {args.device_spec} measures the device, which "
                            "means nothing on --device meta; use --device-spec none or a "
                            f"datasheet name ({', '.join(sorted(DATASHEETS))})")
    if not args.no_latency and (args.runs < 1 or args.warmup < 0):
        raise LeanError(f"--runs must be >= 1 and --warmup >= 0, got --runs {args.runs} "
                        f"--warmup {args.warmup}")
    for shape in args.shapes or ():
        parse_shape(shape)  # a malformed or impossible shape fails before the model loads
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


def _compress(args: argparse.Namespace) -> int:
    import json
    from dataclasses import replace
    from pathlib import Path

    import torch

    from leantorch.compress.recipe import load_recipe, recipe_data, run_recipe
    from leantorch.compress.verify import GateFailure
    from leantorch.io import check_output_dir, read_text_file
    from leantorch.models import load_model
    from leantorch.models.registry import model_label

    recipe = load_recipe(args.recipe)
    if args.seq_len is not None:
        if args.seq_len < 2:
            raise LeanError(f"--seq-len must be >= 2, got {args.seq_len}")
        recipe = replace(recipe, calibration=replace(recipe.calibration, seq_len=args.seq_len))
    if args.threads is not None:
        if args.threads < 1:
            raise LeanError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.latency_runs < 0:
        raise LeanError(f"--latency-runs must be >= 0, got {args.latency_runs}")
    if args.data:
        path = Path(args.data)
        if not path.exists():
            raise LeanError(f"--data {args.data!r}: no such file")
        if not path.is_file():
            raise LeanError(f"--data {args.data!r} is not a regular file")
        text = read_text_file(path, f"--data {args.data!r}")
        texts = [line.strip() for line in text.splitlines() if line.strip()]
        if len(texts) < 4:
            raise LeanError(f"--data {args.data!r} has {len(texts)} non-empty lines; at least 4 "
                            "are needed (calibration and held-out evaluation)")
    # the output folder is checked now, not after minutes of work
    out = Path(args.out or f"out/{model_label(args.model)}-{recipe.name}")
    check_output_dir(out, overwrite=args.overwrite, name="--out")
    loaded = load_model(args.model)
    # the recipe's calibration settings make the data here as in run_recipe(recipe, loaded)
    data = recipe_data(recipe, loaded, texts if args.data else None, shapes=args.shapes)
    calibration, evaluation, ood = data.calibration, data.evaluation, data.evaluation_ood
    print(f"compressing {loaded.name} with recipe {recipe.name!r}: "
          f"{sum(_rows(b) for b in calibration)} calibration and "
          f"{sum(_rows(b) for b in evaluation)} held-out inputs"
          + (f", {sum(_rows(b) for b in ood)} of a second text set" if ood else "")
          + f", {torch.get_num_threads()} thread(s)", flush=True)
    try:
        result = run_recipe(recipe, loaded.model, **data.arguments(),
                            latency_runs=args.latency_runs, progress=not args.json,
                            source=loaded.name)
    except GateFailure as error:
        _print_stages(error.result, args.json)
        print(f"leantorch: {error}; nothing was written", file=sys.stderr)
        return 1
    paths = result.write(out, overwrite=args.overwrite)
    _print_stages(result, args.json)
    if not args.json:
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
    else:
        print(json.dumps({"written": {k: str(v) for k, v in paths.items()}}))
    return 0


def _rows(batch: object) -> int:
    import torch

    tensors = list(batch.values()) if isinstance(batch, dict) else list(batch)
    return next((t.shape[0] for t in tensors if isinstance(t, torch.Tensor)), 0)


def _print_stages(result: object, as_json: bool) -> None:
    import json

    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    header, rows = result.table()
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print("  ".join(header))
        for row in rows:
            print("  ".join(row))
        print(result.timing_note())
        return
    console = Console()
    if not console.is_terminal:  # a pipe or a file: do not squeeze the table to 80 columns
        console = Console(width=max(console.width, 240))
    table = Table(title=f"{result.source}: recipe {result.recipe.name}", title_justify="left")
    for i, name in enumerate(header):  # escaped: "[q1-q3]" is text, not rich markup
        table.add_column(escape(name), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*map(escape, row))
    console.print(table)
    console.print(result.timing_note(), soft_wrap=True, markup=False, highlight=False)


def _recipes() -> int:
    from leantorch.compress.recipe import builtin_recipes, load_recipe

    for name in builtin_recipes():
        description = " ".join(load_recipe(name).description.split())
        print(f"{name}: {description}")
    return 0


def _transforms(args: argparse.Namespace) -> int:
    import json
    import textwrap

    from leantorch.compress.catalog import transforms

    infos = transforms()
    if args.names:
        known = [info.name for info in infos]
        for name in args.names:
            if not any(n == name or n.startswith(f"{name}.") for n in known):
                families = sorted({n.split(".")[0] for n in known})
                raise LeanError(f"transforms: unknown transform or family {name!r}; known: "
                                f"{', '.join(known)} (families: {', '.join(families)})")
        infos = [info for info in infos if any(
            info.name == name or info.name.startswith(f"{name}.") for name in args.names)]
    if args.json:
        print(json.dumps([info.to_dict() for info in infos], indent=2))
        return 0
    for info in infos:
        flags = " [reads calibration]" if info.uses_calibration else ""
        print(f"{info.name}{flags}")
        print(textwrap.indent(textwrap.fill(info.summary, 96), "    "))
        rows = [(f"{k.name}: {k.annotation or 'any'}"
                 + (" (required)" if k.required else f" = {k.default!r}"), k.doc)
                for k in info.knobs]
        width = max((len(left) for left, _ in rows), default=0)
        for left, doc in rows:
            print(f"      {left.ljust(width)}  {doc}".rstrip())
        print()
    return 0


def _models() -> int:
    from leantorch.models import BUILTINS

    width = max(map(len, BUILTINS))
    for name, (description, _) in BUILTINS.items():
        print(f"{name.ljust(width)}  {description}")
    print("\nAlso accepted: a local transformers model folder, a folder written by leantorch "
          "compress, or path/to/file.py:factory.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``leantorch`` command with ``argv`` (default ``sys.argv[1:]``) and return its
    exit status: 0 done, 1 a verification gate failed, 2 bad input, 130 interrupted."""
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        # whatever was being written lives in a temporary folder that is already removed
        print("leantorch: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "profile":
            return _profile(args)
        if args.command == "compress":
            return _compress(args)
        if args.command == "recipes":
            return _recipes()
        if args.command == "transforms":
            return _transforms(args)
        return _models()
    except LeanError as error:
        print(f"leantorch: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
