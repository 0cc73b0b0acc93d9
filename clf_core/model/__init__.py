"""The classifier: a (4-bit) frozen backbone + LoRA adapters + a trained head, from its typed
config to a published artifact, and the predictor that scores with it.

    config       the model and its training recipe (YAML, flags, --set), checked before any work
    labels       labeled tables read with errors a user can act on; class names <-> indices
    batching     texts -> padded token batches (per batch, never to a dataset maximum)
    backbone     where a backbone comes from (hub id, folder, s3://) and its content hash
    build        AutoModelForSequenceClassification + PEFT LoRA over bitsandbytes nf4; pooling
    calibration  the temperature and the review threshold, chosen on validation
    metrics      accuracy, macro-F1, per-class figures
    artifact     safetensors + manifest, model_version = content hash, verified on load
    registry     versions under REGISTRY/NAME/ and the aliases (champion) the scoring jobs resolve
    prequantize  a backbone saved 4-bit once, approved by the artifact
    predict      the Predictor: sorted, bucketed, merged-LoRA (and on CUDA compiled) scoring

May import the base only (clf_core.errors, settings, storage, logs, ...).
"""
