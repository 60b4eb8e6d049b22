"""The plumbing the scripts share, one module per concern. wlt.py holds the method and imports nothing from here
(only its `__main__`, `python wlt.py prepare|estimate`, hands off to commands.py); these modules import wlt.

    console.py     what a user sees: rank-0 messages, one-line errors (WltError), progress bars, --help
    signals.py     stop signals (Ctrl-C, SIGTERM, a scheduler's notice) and how a script ends
    files.py       atomic writes, JSON lines, input fingerprints
    data.py        preference sources (HH-RLHF, TL;DR, pair files), the HH dialogue split, tokenization,
                   the pair filter, rows in a labeler's order
    models.py      loading models and tokenizers, with clear errors; the model a trainer trains, sharded
    dist.py        ranks, devices and dtypes, torchrun process groups and collectives, FSDP2 sharding,
                   data-parallel helpers
    memory.py      memory figures: a training rank's parameters and optimizer state, inference host memory
    outputs.py     the output folder's rules: one run per output (its lock), whose folder it is, outputs apart
                   from inputs, finished outputs switched in whole (a cut switch completed by the next reader),
                   label.py's and evaluate.py's resumable partial results
    checkpoint.py  HF checkpoints, PEFT-layout adapters, mid-run checkpoints, the cached DPO reference
    runs.py        the run folder: its config, each stage's paths, what must be finished first
    trainer.py     the trainers' chores: flags, a run's start (checks, data), batch plan, optimizer, metrics.jsonl,
                   the final save
    tracking.py    --report-to: metrics to TensorBoard or Weights & Biases, when installed
    synthetic.py   the offline synthetic world (digits to sort, exact gold reward, Bradley-Terry annotators)
    defaults.py    the paper's settings and the synthetic world's calibrated ones (learning rates among them)
    prepare.py     `python wlt.py prepare`: a run's data splits and config.json
    estimate.py    `python wlt.py estimate`: memory per device of a training run, before launching it
    commands.py    the command line of `python wlt.py prepare|estimate`
"""
