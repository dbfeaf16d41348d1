"""Real pretrained hosts: GGUF files de-quantized into HF directories (``gguf``) and the lm-eval model class
(``lmeval``)."""
