"""Engines: where the numbers are computed."""

from rh_trl.engines.batching import BatchStats, deduplicate, plan_batches
from rh_trl.engines.generation import ChatClient, HFGenerator
from rh_trl.engines.hf import HFEngine, read_logits

__all__ = [
    "BatchStats",
    "ChatClient",
    "HFEngine",
    "HFGenerator",
    "deduplicate",
    "plan_batches",
    "read_logits",
]
