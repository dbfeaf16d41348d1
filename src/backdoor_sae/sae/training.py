"""Train sae-lens SAEs on captured activations, save/load them in the sae-lens format, splice them into a model.

Training is sae-lens' own ``SAETrainer`` fed by an ``ActivationStore`` iterator: no second training loop here.
Dead latents are the hard part on a small model (STACK.md §7): the dead-latent window is set in tokens
(sae-lens counts it in steps, default 1000, which a short run never reaches, so its AuxK loss never acts),
dead latents are resampled early in training (a thin ``SAETrainer`` subclass; the loop stays sae-lens'), and
``b_dec`` starts at the data mean. Fidelity metrics and the pipeline's SAE stage: :mod:`backdoor_sae.sae.fidelity`.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from backdoor_sae.capture.activations import ActivationStore, check_hooks, first_nonfinite_row
from backdoor_sae.models import LoadedModel

ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu")


# ---------------------------------------------------------------------------------------------- training

def _training_sae(architecture: str, d_in: int, d_sae: int, k: int, *, l1_coefficient: float,
                  l0_coefficient: float, aux_loss_coefficient: float, decoder_init_norm: float | None) -> Any:
    from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, JumpReLUTrainingSAE,
                          JumpReLUTrainingSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE,
                          TopKTrainingSAEConfig)

    common = dict(d_in=d_in, d_sae=d_sae, decoder_init_norm=decoder_init_norm, device="cpu")
    if architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, aux_loss_coefficient=aux_loss_coefficient, **common))
    if architecture == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=k, aux_loss_coefficient=aux_loss_coefficient,
                                                               **common))
    # L1 / L0 penalties are scale dependent: train on inputs normalised to norm sqrt(d_in) (folded in at the end)
    if architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1_coefficient,
                                                             normalize_activations="expected_average_only_in",
                                                             **common))
    if architecture == "jumprelu":
        return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(l0_coefficient=l0_coefficient,
                                                             normalize_activations="expected_average_only_in",
                                                             **common))
    raise ValueError(f"unknown SAE architecture {architecture!r}; choose one of: {', '.join(ARCHITECTURES)}")


def _resampling_trainer(resample_every: int, resample_until: int) -> type:
    """sae-lens' ``SAETrainer`` plus dead-latent resampling (Anthropic, "Towards Monosemanticity"): every
    ``resample_every`` steps until step ``resample_until``, latents dead for the trainer's dead-feature window
    get the direction of a badly reconstructed input of the current batch, and their Adam state is cleared.
    The training loop itself stays sae-lens'."""
    from sae_lens import SAETrainer

    class _Trainer(SAETrainer):  # type: ignore[misc]
        def step(self, batch: Tensor) -> Any:
            out = super().step(batch)
            n = self.n_training_steps + 1
            if resample_every > 0 and n % resample_every == 0 and n <= resample_until:
                self._resample(self.activation_scaler(batch.to(self.sae.device)))
            return out

        @torch.no_grad()
        def _resample(self, x: Tensor) -> None:
            dead = self.dead_neurons.nonzero().squeeze(-1)
            if len(dead) == 0:
                return
            sae = self.sae
            err = (x - sae(x)).pow(2).sum(-1)
            if not err.sum() > 0:
                return
            pick = torch.multinomial(err / err.sum(), len(dead), replacement=len(dead) > len(x))
            dirs = x[pick] - sae.b_dec
            dirs = dirs / dirs.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            alive = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
            alive[dead] = False
            norm = sae.W_dec[alive].norm(dim=-1).mean() if alive.any() else sae.W_dec.norm(dim=-1).mean()
            sae.W_dec[dead] = dirs * norm
            enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else sae.W_enc.norm(dim=0).mean()
            sae.W_enc[:, dead] = dirs.T * enc_norm
            sae.b_enc[dead] = 0.0
            for p, rows in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
                for v in self.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        v[rows] = 0.0
            self.n_forward_passes_since_fired[dead] = 0

    return _Trainer


def _tensor_batches(x: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=gen)
        for b in range(0, len(perm) - batch_size + 1, batch_size):
            yield x[perm[b:b + batch_size]]


def _to_inference(training_sae: Any) -> Any:
    """The inference SAE sae-lens would write with ``save_inference_model`` (BatchTopK becomes JumpReLU)."""
    from sae_lens import SAE

    state = {k: v.detach().clone() for k, v in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)
    sae = SAE.from_dict(training_sae.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(state)
    return sae.eval()


def train_sae(data: ActivationStore | Float[Tensor, "rows d_in"], *, hook: str | None = None,
              architecture: str = "topk", d_sae: int = 512, k: int = 16, n_tokens: int | None = None,
              batch_size: int = 2048, lr: float = 3e-3, lr_end: float | None = None, seed: int = 0,
              aux_loss_coefficient: float = 1.0, dead_window_tokens: int = 25_000, l1_coefficient: float = 5.0,
              l0_coefficient: float = 1.0, decoder_init_norm: float | None = 0.1, model_name: str | None = None,
              resample: bool = True, filters: dict[str, Any] | None = None) -> Any:
    """Train one SAE with sae-lens' ``SAETrainer`` on a store's hook (or an in-memory ``[rows, d_in]``
    tensor) and return the sae-lens inference SAE, with ``cfg.metadata.hook_name`` / ``model_name`` set.
    ``n_tokens`` defaults to 4 passes over the data; the learning rate decays cosine from ``lr`` to
    ``lr_end`` (default ``lr / 10``). ``dead_window_tokens``: a latent silent that long is dead (AuxK acts on
    it; with ``resample`` it is also re-initialised, during the first 60 % of training)."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig

    if isinstance(data, ActivationStore):
        hook = data._hook(hook)
        n_rows, d_in = int(data.mask(**(filters or {})).sum()), data.d_in(hook)
        model_name = model_name if model_name is not None else data.model_path
        batch_size = min(batch_size, n_rows)
        batches = data.batches(hook, batch_size, seed=seed, **(filters or {}))
    else:
        if data.ndim != 2 or len(data) == 0:
            raise ValueError(f"activations must be a non-empty [rows, d_in] tensor, got shape {tuple(data.shape)}")
        bad = first_nonfinite_row(data)
        if bad is not None:
            raise ValueError(f"activations contain NaN/inf (first bad row {bad})")
        n_rows, d_in = data.shape
        batch_size = min(batch_size, n_rows)
        batches = _tensor_batches(data.float(), batch_size, seed)
    n_tokens = n_tokens if n_tokens is not None else 4 * n_rows
    if n_tokens < batch_size:
        raise ValueError(f"n_tokens ({n_tokens}) is smaller than one batch ({batch_size})")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sae = _training_sae(architecture, d_in, d_sae, k, l1_coefficient=l1_coefficient,
                            l0_coefficient=l0_coefficient, aux_loss_coefficient=aux_loss_coefficient,
                            decoder_init_norm=decoder_init_norm)
        first = next(batches)
        if sae.cfg.normalize_activations == "none":
            with torch.no_grad():
                sae.b_dec.copy_(first.mean(0))  # start the decoder bias at the data mean, not at 0
        sae.cfg.metadata.hook_name = hook or ""
        sae.cfg.metadata.model_name = model_name or ""
        tcfg = SAETrainerConfig(
            total_training_samples=n_tokens, train_batch_size_samples=batch_size, lr=lr,
            lr_end=lr_end if lr_end is not None else lr / 10, lr_scheduler_name="cosineannealing",
            device="cpu", dead_feature_window=max(1, dead_window_tokens // batch_size),
            n_batches_for_norm_estimate=max(1, min(32, 100_000 // batch_size)),
            logger=LoggingConfig(log_to_wandb=False), checkpoint_path=None)
        steps = tcfg.total_training_steps
        trainer_cls = _resampling_trainer(resample_every=tcfg.dead_feature_window if resample else 0,
                                          resample_until=int(steps * 0.6))
        trained = trainer_cls(cfg=tcfg, sae=sae, data_provider=_chain(first, batches)).fit()
    return _to_inference(trained)


def train_sae_from_config(store: ActivationStore, hook: str, cfg: Any, n_tokens: int, **extra: Any) -> Any:
    """:func:`train_sae` with the architecture and training settings of ``cfg.sae`` (a
    :class:`~backdoor_sae.config.Config`) and its seed; ``extra`` (e.g. ``filters``, ``model_name``) passes on."""
    sc = cfg.sae
    return train_sae(store, hook=hook, architecture=sc.architecture, d_sae=sc.d_sae, k=sc.k, n_tokens=n_tokens,
                     batch_size=sc.batch_size, lr=sc.lr, lr_end=sc.lr_end, seed=cfg.seed,
                     aux_loss_coefficient=sc.aux_loss_coefficient, dead_window_tokens=sc.dead_window_tokens,
                     resample=sc.resample_dead, l1_coefficient=sc.l1_coefficient,
                     l0_coefficient=sc.l0_coefficient, **extra)


def _chain(first: Tensor, rest: Iterator[Tensor]) -> Iterator[Tensor]:
    yield first
    yield from rest


def train_saes(store: ActivationStore, hooks: Sequence[str] | None = None, **kwargs: Any) -> dict[str, Any]:
    """One SAE per hook from a single capture (``hooks=None``: every hook in the store)."""
    return {h: train_sae(store, hook=h, **kwargs) for h in (hooks or store.hooks)}


# ------------------------------------------------------------------------------------------- save / load

_PATHS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def sae_path(sae: Any) -> str | None:
    """Where an SAE was last saved to or loaded from (``None`` for one only in memory): edits name it in JSON."""
    return _PATHS.get(sae)


def save_sae(sae: Any, path: str | Path) -> Path:
    """Write the SAE in the sae-lens format (``cfg.json`` + ``sae_weights.safetensors``), atomically."""
    from backdoor_sae._io import atomic_dir

    path = Path(path)
    with atomic_dir(path) as tmp:
        sae.save_model(tmp)
    _PATHS[sae] = str(path.resolve())
    return path


def load_sae(path: str | Path) -> Any:
    """Load an SAE written by :func:`save_sae`, by sae-lens' runner, or by any other sae-lens tool."""
    from sae_lens import SAE

    path = Path(path)
    if not (path / "cfg.json").is_file():
        raise FileNotFoundError(f"no sae-lens SAE at {path} (missing cfg.json)")
    sae = SAE.load_from_disk(str(path), device="cpu").eval()
    _PATHS[sae] = str(path.resolve())
    return sae


def load_saes(directory: str | Path) -> dict[str, Any]:
    """Every SAE in a folder of ``<hook>/`` sub-folders (as ``sae_stage`` writes them), keyed by hook name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"SAE folder not found: {directory}")
    saes = {p.name: load_sae(p) for p in sorted(directory.iterdir()) if (p / "cfg.json").is_file()}
    if not saes:
        raise FileNotFoundError(f"no SAEs in {directory} (expected <hook>/cfg.json sub-folders)")
    return saes


def check_sae_fits(sae: Any, model: LoadedModel, hook: str) -> None:
    """Refuse an SAE whose input width differs from the hook's activation width, naming both."""
    width = hook_width(model, hook)
    if sae.cfg.d_in != width:
        raise ValueError(f"SAE width d_in={sae.cfg.d_in} does not match hook {hook!r} width {width}")


def hook_width(model: LoadedModel, hook: str) -> int:
    """Width of a hook's activation, from a one-token forward pass (works for any hook, not only d_model);
    refuses a hook the model lacks. Cached on the model."""
    if hook not in model.hook_widths:
        check_hooks(model, [hook])
        with torch.no_grad():
            _, cache = model.hooked.run_with_cache(torch.tensor([[model.tokenizer.bos_token_id or 0]],
                                                                device=model.hf.device), names_filter=[hook])
        model.hook_widths[hook] = int(cache[hook].shape[-1])
    return model.hook_widths[hook]


# ----------------------------------------------------------------------------------------------- splicing

@contextmanager
def splice_sae(model: LoadedModel, sae: Any, hook: str | None = None, *, error_term: bool = False,
               zero: bool = False, max_norm: float | None = None) -> Iterator[None]:
    """Within the block, the hook's activation is replaced by the SAE reconstruction (``error_term``: plus
    the reconstruction error, which leaves the model's output unchanged; ``zero``: by zeros, the ablation
    baseline). With ``max_norm``, positions whose norm exceeds it keep their activation (the edits' norm guard,
    e.g. a host's attention-sink first position, which no SAE was trained on). The hook is removed on exit,
    also on error."""
    hook = hook or sae.cfg.metadata.hook_name
    check_hooks(model, [hook])

    def fn(x: Float[Tensor, "batch pos d_in"], hook: Any) -> Float[Tensor, "batch pos d_in"]:
        if zero:
            out = torch.zeros_like(x)
        else:
            x_hat = sae.decode(sae.encode(x))
            out = x_hat + (x - x_hat) if error_term else x_hat
        if max_norm is not None:
            out = torch.where(x.norm(dim=-1, keepdim=True) > max_norm, x, out)
        return out

    with model.hooked.hooks(fwd_hooks=[(hook, fn)]):
        yield
