"""Pre-quantize a model's backbone to nf4 once, and approve the copy for that model.

Run as (the publisher, once per model and kind of machine that scores):

    python -m jobs.prequantize --model s3://models/income-expense/v3 --output /models/mistral-7b-nf4
    python -m jobs.label --model s3://models/income-expense/v3 --backbone /models/mistral-7b-nf4 ...

Every scoring actor otherwise reads the 16-bit base (14.5 GB for Mistral-7B) and quantizes it on
start; the copy is the 4-bit weights as they are (~4 GB). The model's manifest then lists the
copy's content hash, so a scoring actor accepts exactly that copy and nothing else; approving
changes no prediction, so the model version stays the same. `--model` must be a local directory
or an s3:// URI this process may write. Exit status 0 done, 1 the object store cannot be used,
2 bad arguments.
"""

from __future__ import annotations

import sys

from clf_core import cli


def build_parser():
    from clf_core.model.prequantize import PrequantizeSettings

    return cli.build_parser("python -m jobs.prequantize", __doc__, PrequantizeSettings)


def quantize(args) -> int:
    from clf_core.model.artifact import open_artifact
    from clf_core.model.prequantize import PrequantizeSettings, approve, prequantize
    from clf_core.model.registry import resolve_model
    from clf_core.settings import from_args

    settings = from_args(PrequantizeSettings, args).validate()
    settings.model = resolve_model(settings.model).uri   # REGISTRY/NAME@champion: that version
    art = open_artifact(settings.model)
    made = prequantize(art.config(), art.manifest["backbone"]["id"], settings.output, device=settings.device or None)
    approve(settings.model, settings.output)
    print(f"pre-quantized {art.manifest['backbone']['id']} into {settings.output} (content sha256 "
          f"{made['sha256'][:12]}), approved for model {art.model_version}\n  score with: --backbone {settings.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main(build_parser(), argv, quantize)


if __name__ == "__main__":
    sys.exit(main())
