"""clf_core: the QLoRA ledger line-item classifier as a library (no cluster needed).

Modules by role: config (typed settings), data (tables, labels, tokenization), model (backbone +
4-bit + LoRA), train (the loop), metrics, artifact (safetensors + manifest), predict (scoring),
recipe (train -> evaluate -> save in one process), storage (fsspec URIs), tiny (test backbones).
"""

__version__ = "0.1.0"
