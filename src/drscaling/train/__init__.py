"""Fine-tune one dense retriever of shape N on D annotated pairs (paper section 3.4) and track it in MLflow.

Loss (eq. 3): for each batch, a pool of `negatives` random train-corpus passages (batch positives
excluded) is shared by every query; cross-entropy of the positive against that pool, optionally with
the other queries' positives as extra in-batch negatives. Fixed number of steps, AdamW.

Every step's sample is a pure function of (seed, step), and the checkpoint stores model, optimiser,
scheduler and torch RNG state, so a run killed mid-way and started again with the same parameters
resumes and ends with the same metrics as an uninterrupted one.

The run records the best dev contrastive entropy, the test contrastive entropy at that checkpoint,
and the minimum test contrastive entropy over training (the paper's figure of merit).

    config.py      TrainConfig (its key() is a run's identity), Paths, the checks of a configuration
    data.py        the D pairs a run trains on, the corpus its negatives come from, the data's version (data_key)
    step.py        one optimiser step of eq. 3: the step's sample, the loss, AdamW and its schedule
    resume.py      the checkpoint of an unfinished run (SIGTERM checkpoints at a step boundary), a finished run's metrics
    evaluation.py  dev/test CE during training, the zero-shot starting point
    convergence.py whether a run converged (its tolerance is shared with the laws' checks)
    record.py      the run's MLflow run and its result (metrics.json, the registered model)
    run.py         train(): check, build, loop over the steps, finish

Nothing is imported here: a caller imports the module it uses (step.py needs only numpy and torch).
"""
