"""Post-training (paper §4): the chat format, generated verifiable tasks, rule-based rewards and a learned reward
model, rejection-sampling SFT and DPO with early stopping, on TRL and transformers (install the ``posttrain``
extra). ``kunlun posttrain --help`` and docs/guide-posttrain.md say how to run each stage."""
