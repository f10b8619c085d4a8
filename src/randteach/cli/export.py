"""`randteach export` and `randteach embed`: the trained encoder and its features, outside the run."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def cmd_export(args, extra) -> int:
    from ..runs.export import export_encoder
    if extra:
        raise UserError(f"unexpected argument(s) {' '.join(extra)}; `randteach export` takes RUN_DIR "
                        "[--which student|teacher] [--format safetensors|pt] [--out DIR]")
    meta = export_encoder(args.run_dir, args.which, args.format, args.out)
    print(f"{args.which} encoder: {meta.parent / meta.stem}.{args.format} (+ {meta.name}); "
          f"load it with randteach.load_encoder({str(meta)!r})")
    return 0


def cmd_embed(args, extra) -> int:
    from ..runs.export import embed_run
    if extra:
        raise UserError(f"unknown option(s) {' '.join(extra)}; `randteach embed` takes --out FILE.npz, "
                        "--data.name NAME and --data.root DIR")
    out = args.out or str(Path(args.run_dir) / "export" / f"features{'-' + args.data_name if args.data_name else ''}.npz")
    if not out.endswith(".npz"):
        raise UserError(f"--out {out!r}: expected a file name ending in .npz")
    out = embed_run(args.run_dir, out, args.data_name, args.data_root, progress=not args.quiet)
    print(f"features: {out}")
    return 0


def add_parser(sub) -> None:
    from ..runs.export import EXPORTABLE, FORMATS
    p = sub.add_parser("export", help="write a run's encoder weights (safetensors or pt) + a JSON to rebuild it",
                       description="Write the student's (or --which teacher's) encoder weights and a JSON that says "
                                   "how to rebuild it and normalize its inputs; randteach.load_encoder(JSON) "
                                   "returns the module.")
    p.add_argument("run_dir")
    p.add_argument("--which", choices=EXPORTABLE, default="student", help="the encoder to write (default student)")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors (no code runs on loading) or a torch .pt file (default safetensors)")
    p.add_argument("--out", help="folder (default RUN_DIR/export)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embed", help="teacher and student features of the train and test splits, as .npz",
                       description="Teacher and student encoder features of the train and test splits of the "
                                   "run's data set (or --data.name NAME, read from --data.root DIR), as .npz.")
    p.add_argument("run_dir")
    p.add_argument("--out", help="FILE.npz (default RUN_DIR/export/features.npz, features-NAME.npz with --data.name)")
    p.add_argument("--data.name", dest="data_name", metavar="NAME", help="another data set to embed")
    p.add_argument("--data.root", dest="data_root", metavar="DIR", help="where that data set is read from")
    p.set_defaults(func=cmd_embed)
