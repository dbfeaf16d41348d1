"""The alternatives an SAE edit must beat: residual directions (``directions``), blue-team fine-tuning
(``finetune``), weight interpolation and logit ensembles (``mixing``), and the demo's blue stage (``blue``)."""
