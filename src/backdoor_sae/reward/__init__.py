"""Reward callables and the toy reward model (``model``), and reward attribution of SAE latents (``attribution``)."""
