"""Planning a decomposition: the rows and their JSON (`rows`), the planner (`planner`),
selecting layers by name (`targeting`), merge detection (`dataflow`, `merging`), rank allocation
by sensitivity (`sensitivity`, `allocation`) and execution forms (`forms`)."""

from lrdaccel.planning.allocation import allocate_ranks
from lrdaccel.planning.merging import find_merge_candidates
from lrdaccel.planning.planner import PlanConfig, plan
from lrdaccel.planning.rows import LayerPlan, MergeBlock, Plan
from lrdaccel.planning.schema import KINDS

__all__ = ["KINDS", "LayerPlan", "MergeBlock", "Plan", "PlanConfig", "allocate_ranks", "find_merge_candidates", "plan"]
