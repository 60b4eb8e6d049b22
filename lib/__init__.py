"""The plumbing the scripts share, one module per concern. wlt.py holds the method and imports nothing from here
(only its `__main__`, `python wlt.py prepare|estimate`, hands off to commands.py); these modules import wlt.

    console.py     rank-0 logging, one-line errors, progress bars, --help formatting
    files.py       atomic writes, JSON lines, input fingerprints
    data.py        preference sources (HH-RLHF, TL;DR, pair files), the HH dialogue split, tokenization,
                   the pair filter, rows in a labeler's order
    models.py      loading models and tokenizers, with clear errors; the model a trainer trains, sharded
    dist.py        devices and dtypes, torchrun process groups, FSDP2 sharding, data-parallel helpers
    memory.py      memory figures: a training rank's parameters and optimizer state, inference host memory
    outputs.py     whose folder an output is, outputs apart from inputs, finished outputs swapped in whole
    checkpoint.py  HF checkpoints, PEFT-layout adapters, mid-run checkpoints, the cached DPO reference
    runs.py        the run folder: its config, each stage's paths, what must be finished first
    trainer.py     what train_sft.py and train_dpo.py share: flags, data, batch plan, optimizer, the end of a step
    tracking.py    --report-to: metrics to TensorBoard or Weights & Biases, when installed
    resumable.py   label.py's and evaluate.py's resumable, sharded batches of work
    synthetic.py   the offline synthetic world (digits to sort, exact gold reward, Bradley-Terry annotators)
    defaults.py    the paper's settings and the synthetic world's calibrated ones (learning rates among them)
    prepare.py     `python wlt.py prepare`: a run's data splits and config.json
    estimate.py    `python wlt.py estimate`: memory per device of a training run, before launching it
    commands.py    the command line of `python wlt.py prepare|estimate`
"""
