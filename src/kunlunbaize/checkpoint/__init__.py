"""The checkpoint format: the one reader and writer of runs, training checkpoints and exports.

``folder`` knows the layout and reads it (resolving a path to a checkpoint, its config, architecture, weights and
trainer state); ``state`` saves and restores a training checkpoint (DCP, re-shardable); ``dcp_weights`` reads a
checkpoint's weights from its DCP files in one process, tensor by tensor; ``keys`` maps weight names to and from the
transformers layout; ``tokenizer`` loads the tokenizer saved with a checkpoint. Features (train, infer,
hf, eval, serve, posttrain) read checkpoints only through this package.
"""

from .errors import CheckpointDamaged, CheckpointError
from .folder import (
    check_keys,
    checkpoint_arch,
    checkpoint_dirs,
    has_full_weights,
    is_export,
    is_training_checkpoint,
    latest_checkpoint,
    read_config,
    read_trainer_state,
    read_weights,
    resolve_checkpoint,
    tokenizer_digest,
    training_data,
    weight_names,
)
from .tokenizer import load_tokenizer

__all__ = ["CheckpointDamaged", "CheckpointError", "check_keys", "checkpoint_arch", "checkpoint_dirs",
           "has_full_weights", "is_export", "is_training_checkpoint", "latest_checkpoint", "load_tokenizer",
           "read_config", "read_trainer_state", "read_weights", "resolve_checkpoint", "tokenizer_digest",
           "training_data", "weight_names"]
