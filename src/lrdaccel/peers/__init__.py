"""What users would pick instead of LRD, built at a budget matched to an LRD variant.

- `prune`: structured channel pruning with torch-pruning (magnitude or Taylor importance), the
  pruning ratio searched until the pruned copy has the parameters (or the inference time) asked
  for; attention heads and MLP widths in transformers. `save_pruned` / `load_pruned` keep it.
- `lora`: LoRA adapters with PEFT on the layers an LRD plan decomposes; `merge_lora` folds them
  back into a model of the original architecture.

Both need the `peers` extra (`pip install lrdaccel[peers]`); `require_peers(kind)` checks it up
front. torch-pruning and PEFT are imported only when a peer runs.
"""

from lrdaccel.peers._extra import require_peers
from lrdaccel.peers.budget import lrd_params
from lrdaccel.peers.importance import labelled_loss
from lrdaccel.peers.adapters import LoraReport, LoraSettings, lora, lora_targets, merge_lora
from lrdaccel.peers.pruning import prune
from lrdaccel.peers.prune_config import PruneConfig, PruneReport
from lrdaccel.peers.pruned_io import load_pruned, save_pruned

__all__ = ["LoraReport", "LoraSettings", "PruneConfig", "PruneReport", "labelled_loss", "load_pruned", "lora",
           "lora_targets", "lrd_params", "merge_lora", "prune", "require_peers", "save_pruned"]
