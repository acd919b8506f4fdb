"""Planning a decomposition: the rows and their JSON (`rows`), the planner (`planner`), and
selecting layers by name (`targeting`)."""

from lrdaccel.planning.planner import PlanConfig, plan
from lrdaccel.planning.rows import KINDS, LayerPlan, Plan

__all__ = ["KINDS", "LayerPlan", "Plan", "PlanConfig", "plan"]
