"""Joint planner: experts kept and per-expert widths chosen together under one byte target."""

from moeslim.methods.joint.config import JointConfig
from moeslim.methods.joint.driver import HeldOptions, measure_held, measure_nonexpert, measure_options, plan_joint

__all__ = ["HeldOptions", "JointConfig", "measure_held", "measure_nonexpert", "measure_options", "plan_joint"]
