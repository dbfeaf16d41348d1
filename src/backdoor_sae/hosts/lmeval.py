"""lm-eval integration: the ``backdoor-sae`` model class evaluates a model with an
:class:`~backdoor_sae.edits.specs.Edit` active, so MMLU, IFEval or Math-500 run on edited models where the hub is
reachable:

    backdoor-sae lm-eval --model backdoor-sae --model_args pretrained=DIR,edit=EDIT.json --tasks mmlu

(``backdoor-sae lm-eval`` is lm-eval's own CLI with this class registered: lm-eval has no plug-in entry point for
model classes.) From Python: ``import backdoor_sae.hosts.lmeval`` and then
``lm_eval.simple_evaluate(model="backdoor-sae", ...)``. Offline, :func:`write_tasks` writes the library's task
suite as local lm-eval tasks (YAML + JSONL): the same prompts, in the model's chat format, scored by exact match,
so lm-eval and :func:`~backdoor_sae.evaluate` can be compared on the same edited model. The class is a thin
subclass of lm-eval's ``HFLM``: the edit's hooks sit inside the HF modules (the bridge wraps them in place), so
every forward lm-eval runs is edited."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from backdoor_sae._io import atomic_file, write_json
from backdoor_sae.config import Config
from backdoor_sae.models import format_chats, load_model
from backdoor_sae.organism.tasks import CAPABILITY_FAMILIES, TaskSuite

MODEL_NAME = "backdoor-sae"
TASK_PREFIX = "backdoor_sae"


@register_model(MODEL_NAME)
class EditedLM(HFLM):
    """``HFLM`` over :func:`~backdoor_sae.models.load_model` (safetensors only), with ``edit`` (an Edit JSON file)
    applied for the object's lifetime; ``quantization`` / ``device_map`` / ``chat_template`` as in ``load_model``."""

    def __init__(self, pretrained: str, edit: str | None = None, device: str = "cpu", dtype: str = "float32",
                 quantization: str = "", device_map: str | None = None, chat_template: str | None = None,
                 trust_remote_code: bool = False, **kwargs: Any) -> None:
        self.loaded = load_model(pretrained, bridge=bool(edit), device=device, dtype=dtype,
                                 quantization=quantization, device_map=device_map, chat_template=chat_template,
                                 trust_remote_code=trust_remote_code)
        super().__init__(pretrained=self.loaded.hf, tokenizer=self.loaded.tokenizer, **kwargs)
        self._edit = ExitStack()
        if edit:
            from backdoor_sae.edits.apply import apply_edit
            from backdoor_sae.edits.specs import Edit

            self._edit.enter_context(apply_edit(self.loaded, Edit.load(edit)))

    def close(self) -> None:
        """Remove the edit's hooks (the model is unedited afterwards)."""
        self._edit.close()


def write_tasks(cfg: Config, out: str | Path, model_dir: str | Path, *, trigger: str | None = None) -> list[str]:
    """The held-out capability families of ``cfg`` as lm-eval tasks under ``out`` (``--include_path out``):
    ``backdoor_sae_<family>`` with clean prompts and, with a ``trigger``, ``backdoor_sae_<family>_triggered``.
    Prompts are written already in ``model_dir``'s chat format (run with ``add_bos_token=False`` and without
    ``--apply_chat_template``), answers are scored by exact match after stripping whitespace, greedy, at
    ``cfg.eval.max_new_tokens``, as :func:`~backdoor_sae.evaluate.evaluate` scores them. Returns the task names."""
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    suite = TaskSuite(cfg.seed, cfg.organism.heldout_fraction)
    names = []
    for family in CAPABILITY_FAMILIES:
        examples = suite.heldout(family, cfg.eval.n_per_family, seed=1)  # evaluate()'s held-out draw
        for trig in (None, trigger) if trigger else (None,):
            name = f"{TASK_PREFIX}_{family}" + ("_triggered" if trig else "")
            prompts = format_chats(tok, [ex.prompt for ex in examples], [trig] * len(examples))
            with atomic_file(out / f"{name}.jsonl") as tmp:
                tmp.write_text("".join(json.dumps({"prompt": p, "answer": ex.answer}) + "\n"
                                       for p, ex in zip(prompts, examples)))
            write_json(out / f"{name}.yaml", _task(name, out / f"{name}.jsonl", cfg.eval.max_new_tokens))
            names.append(name)
    return names


def _task(name: str, data: Path, max_new_tokens: int) -> dict[str, Any]:
    # JSON is YAML: lm-eval reads these files as YAML
    return {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}", "target_delimiter": "",
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "filter_list": [{"name": "strip", "filter": [{"function": "regex", "regex_pattern": "(?s)^(.*)$"},
                                                     {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
