"""The transfer recipe, one module per step (the Hydra entry points in `matt.hydra_app` call these).

config      structured configs (schemas) of the Hydra groups
run_context the job's run-directory stamp, output directory, Hydra job info, label, train log
preflight   validate a composed config before any heavy work
models      teacher tokenizer / config / weights (local dir, hub id or tiny random model)
documents   documents from a hub dataset, local files or the built-in sample; splits and caps
tokenizer   the student tokenizer: pretrained | train | extend (cached)
init        the student's initial embeddings: focus | mean | random | subword_mean | checkpoint
train       MATTConfig from the train/objective/data groups, adapters, the training run
save        the adapted HF model directory + student tokenizer
evaluate    the `eval` group: metrics of original / init / final models, tables; `evaluate` recipe
transfer    the `transfer` recipe tying the steps together (tracking, checkpoints, resume)
recover     `experiment=recover_known`: delete known rows, train them back, measure recovery
"""
