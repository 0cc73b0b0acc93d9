"""Pre-quantize a model's backbone to nf4 once, and approve the copy for that model.

Run as (the publisher, once per model and kind of machine that scores):

    python -m jobs.prequantize --model s3://models/income-expense/v3 --output /models/mistral-7b-nf4
    python -m jobs.label --model s3://models/income-expense/v3 --backbone /models/mistral-7b-nf4 ...

Every scoring actor otherwise reads the 16-bit base (14.5 GB for Mistral-7B) and quantizes it on
start; the copy is the 4-bit weights as they are (~4 GB). The model's manifest then lists the
copy's content hash, so a scoring actor accepts exactly that copy and nothing else; approving
changes no prediction, so the model version stays the same. `--model` must be a local directory
or an s3:// URI this process may write. Exit status 0 done, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from clf_core.errors import ClfError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.prequantize", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--model", required=True, help="The published model (artifact) whose backbone to quantize.")
    parser.add_argument("--output", required=True, help="A new local directory for the 4-bit copy.")
    parser.add_argument("--device", default=None, help="Quantize on this device (cuda, cpu; default: the "
                                                       "model's setting). Use the kind that will score.")
    return parser


def main(argv: list[str] | None = None) -> int:
    from clf_core.artifact import open_artifact
    from clf_core.logs import setup_logging
    from clf_core.prequantize import approve, prequantize

    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        art = open_artifact(args.model)
        made = prequantize(art.config(), art.manifest["backbone"]["id"], args.output, device=args.device)
        approve(args.model, args.output)
    except ClfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"pre-quantized {art.manifest['backbone']['id']} into {args.output} (content sha256 {made['sha256'][:12]}), "
          f"approved for model {art.model_version}\n  score with: --backbone {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
