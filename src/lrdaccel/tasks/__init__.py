"""Real labelled tasks offline, and a model made into a classifier for one.

- `registry`: tasks by name (`load_task`: "wordnet-supersense", "fashion-mnist", a JSONL path),
  prepared for a zoo model;
- `text`: WordNet noun supersenses from Debian's wordnet-base, a user's JSONL file;
- `data`: labelled items fetched as model-ready batches (tensors, or texts padded per batch);
- `classifier`: a pretrained model with a new head for a task's classes.
"""

from lrdaccel.tasks.classifier import EncoderClassifier, make_classifier
from lrdaccel.tasks.data import RaceData, TensorData, TokenData
from lrdaccel.tasks.registry import TASKS, check_task, load_task
from lrdaccel.tasks.text import Overlap

__all__ = ["EncoderClassifier", "Overlap", "RaceData", "TASKS", "TensorData", "TokenData", "check_task", "load_task",
           "make_classifier"]
