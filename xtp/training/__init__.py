"""Training through sharded models.

Backward needs no switch: every TP layer's collectives are autograd-aware
(:mod:`xtp.accelerators.comm.autograd`); ``model.train()``/``model.eval()`` and autograd decide
the rest. What training adds: a vocab-parallel loss (:mod:`.loss`), seeds for a tp x dp world
(:mod:`.seeds`), data-parallel gradient averaging (:mod:`.data_parallel`) and checkpoints that
resume at the same or another tp (:mod:`.checkpoint`). See docs/training.md.
"""

from .checkpoint import gather_training_state, load_training_state, save_training_state
from .data_parallel import all_reduce_dp_gradients
from .loss import causal_lm_loss, local_logits, vocab_parallel_cross_entropy
from .seeds import seed_everything

__all__ = [
    "all_reduce_dp_gradients", "causal_lm_loss", "gather_training_state", "load_training_state",
    "local_logits", "save_training_state", "seed_everything", "vocab_parallel_cross_entropy",
]
