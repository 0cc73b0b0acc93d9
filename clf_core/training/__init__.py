"""Training a model: data split (with reviewers' answers merged in), the training loop, the
one-process recipe and the Ray Train job that publishes an artifact with its evaluation report.

    data    Split, stratified_split, LabeledTexts, add_answers (jobs.train --corrections)
    loop    Trainer: AdamW, clipping, plateau schedule on validation loss, early stopping, checkpoints
    recipe  train -> calibrate -> evaluate -> save, in one process (tests, the bench)
    job     the same under Ray Train (jobs.train): settings, the worker, publish to --output or a registry
    report  report.md, metrics.json and the plots

May import the base, model/ and review/; never labeling/.
"""
