"""The publishing command: `export` (optionally registered in the MLflow Model Registry)."""
from __future__ import annotations

import argparse
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    """Consolidate a checkpoint into a Hugging Face model directory."""
    from sabiscale.publish.export import export_hf

    out = export_hf(Path(args.checkpoint), Path(args.out))
    print(f"exported to {out}: load with AutoModelForCausalLM.from_pretrained({str(out)!r}) "
          f"and AutoTokenizer.from_pretrained({str(out)!r}); model card: {out / 'README.md'}")
    if args.register:
        from sabiscale.config import build_config
        from sabiscale.publish.registry import register_export
        from sabiscale.train.checkpoint import read_sidecar, resolve_checkpoint

        tag_dir = resolve_checkpoint(Path(args.checkpoint))
        meta, _ = read_sidecar(tag_dir)
        done = register_export(out, args.register, build_config(meta["config"], origin=str(tag_dir)), meta, tag_dir)
        print(f"registered {done.name} version {done.version} (MLflow run {done.run_id}) in {done.uri}")
    return 0


def register(sub) -> None:
    ex = sub.add_parser("export", help="consolidate a checkpoint into a Hugging Face model directory")
    ex.add_argument("checkpoint", help="checkpoints/step_XXXXXXXX (or checkpoints/, to take `latest`)")
    ex.add_argument("out", help="a new directory for the Hugging Face model (never overwritten)")
    ex.add_argument("--register", metavar="NAME", default=None,
                    help="also log it to the run that trained it and register it as a version of model NAME "
                         "in the MLflow Model Registry")
    ex.set_defaults(func=cmd_export)
