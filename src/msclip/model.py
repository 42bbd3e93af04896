"""MSCLIP: one dual-encoder class for the whole sharing spectrum (CLIP ... MS-CLIP-S).

Data flow:
  image -> ImageTower.embed (patchify or conv stem, +cls, +pos, ln_pre) -> Trunk("image", with the
        ParallelBranch's lateral hook fusing its stages before the configured layers)
        -> ImageTower.pool (ln_post of cls) @ proj
  tokens -> TextTower.embed (token + pos) -> Trunk("text", causal) -> TextTower.pool (ln_final of EOT) @ proj
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelCfg
from .errors import MsclipError
from .layers import LayerNorm
from .parallel import ParallelBranch
from .stems import ConvStem, PatchEmbed
from .trunk import BeforeBlockHook, Trunk


class ModelInputError(MsclipError):
    """Images or tokens of a shape the model cannot take (the message names the expected one)."""


class ImageTower(nn.Module):
    """The image-only parts around the trunk: the embedding in front (stem, class token, positions,
    ln_pre), MS-CLIP-S's parallel branch beside it, and the head behind it (ln_post, proj)."""

    def __init__(self, cfg: ModelCfg):
        super().__init__()
        v, d = cfg.vision, cfg.vision.width
        if v.stem == "conv":
            self.stem: nn.Module = ConvStem(d, cfg.stem_strides(), v.stem_first_kernel)
        else:
            self.stem = PatchEmbed(d, v.patch_size)
        grid = cfg.grid_size()
        self.image_size = v.image_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, d))
        self.ln_pre = LayerNorm(d, eps=cfg.norm_eps)
        self.ln_post = LayerNorm(d, eps=cfg.norm_eps)
        self.proj = nn.Parameter(torch.zeros(d, cfg.embed_dim))
        self.parallel: ParallelBranch | None = None
        if cfg.parallel is not None:
            self.parallel = ParallelBranch(d, cfg.parallel_strides(), cfg.parallel_t2b_kernels(),
                                           cfg.parallel.lateral_layers, cfg.norm_eps,
                                           cfg.parallel.bottleneck_bn_eps)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, BeforeBlockHook | None]:
        """Images -> trunk input tokens [B, 1 + h*w, D] and the parallel branch's lateral hook (None
        without a branch)."""
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ModelInputError(f"images of shape {list(images.shape)}: this model takes [B, 3, "
                                  f"{self.image_size}, {self.image_size}] (vision.image_size={self.image_size})")
        pair = None
        if self.parallel is not None and isinstance(self.stem, ConvStem):
            # The branch's first conv reads the images too: it runs inside the stem's first conv.
            pair = self.stem.entry_pair(images, self.parallel.stages[0])
        x = self.stem(images) if pair is None else self.stem(images, pair[0])
        first = None if pair is None else pair[1]
        b, d, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # row-major grid -> [B, h*w, D]
        cls = self.class_embedding.to(x.dtype).expand(b, 1, d)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        hook = None if self.parallel is None else self.parallel.lateral_hook(images, h, w, first)
        return self.ln_pre(x), hook

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Trunk output [B, L, D] -> ln_post of the class token [B, D]."""
        return self.ln_post(tokens[:, 0])


class TextTower(nn.Module):
    """The text-only parts around the trunk: token and position embeddings in front, ln_final and
    proj behind."""

    def __init__(self, cfg: ModelCfg):
        super().__init__()
        t = cfg.text
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.zeros(t.context_length, t.width))
        self.ln_final = LayerNorm(t.width, eps=cfg.norm_eps)
        self.proj = nn.Parameter(torch.zeros(t.width, cfg.embed_dim))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        context = self.positional_embedding.shape[0]
        if tokens.dim() != 2 or tokens.shape[1] > context:
            raise ModelInputError(f"tokens of shape {list(tokens.shape)}: this model takes [B, L] with L <= "
                                  f"text.context_length={context} (tokenize with the model's tokenizer)")
        x = self.token_embedding(tokens)
        return x + self.positional_embedding[: tokens.shape[1]].to(x.dtype)

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Trunk output [B, L, D] -> ln_final at the EOT (argmax) position [B, D]."""
        pooled = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return self.ln_final(pooled)


class MSCLIP(nn.Module):
    def __init__(self, cfg: ModelCfg, fit_batchnorm_stats: bool = True):
        super().__init__()
        cfg.validate(cfg.name or "config")
        self.cfg = cfg
        self.image = ImageTower(cfg)
        self.text = TextTower(cfg)
        self.trunk = Trunk(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.init_weights(fit_batchnorm_stats)

    # ------------------------------------------------------------------ encoders
    def _image_tokens(self, images: torch.Tensor, collect: dict | None = None,
                      attn_layers: tuple[int, ...] = ()) -> torch.Tensor:
        images = images.to(self.image.positional_embedding.dtype)
        x, hook = self.image.embed(images)
        return self.trunk(x, "image", hook, collect, attn_layers)

    def encode_image(self, images: torch.Tensor, normalize: bool = False, project: bool = True) -> torch.Tensor:
        """Image embeddings [B, embed_dim]; ``project=False`` stops before the projection ([B, width]:
        the features the CLIP paper's linear probes of ViTs use)."""
        x = self.image.pool(self._image_tokens(images))
        if project:
            x = x @ self.image.proj.to(x.dtype)
        return F.normalize(x, dim=-1) if normalize else x

    @staticmethod
    def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
        """Cut a batch to its longest caption. Exact: the text is causal and pooled at the EOT
        (argmax) position, so tokens after every EOT cannot change the pooled outputs.
        Cut to the longest caption itself, not rounded up: compiled graphs mark the length dynamic (one
        graph for all lengths), and rounding to 8 cost the tiny models' training step 4 % on CPU.
        """
        if tokens.shape[0] == 0:  # an empty batch has no longest caption
            return tokens
        return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]

    def _text_tokens(self, tokens: torch.Tensor, collect: dict | None = None,
                     attn_layers: tuple[int, ...] = ()) -> torch.Tensor:
        x = self.text.embed(tokens).to(self.text.positional_embedding.dtype)
        return self.trunk(x, "text", None, collect, attn_layers)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False, trim: bool = True) -> torch.Tensor:
        if trim:
            tokens = self.trim_tokens(tokens)
        x = self._text_tokens(tokens)
        x = self.text.pool(x, tokens) @ self.text.proj.to(x.dtype)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                trim: bool = True) -> dict:
        """Normalised features and the temperature; ``trim=False`` for tokens already cut by `trim_tokens`
        (the trainer trims once per step, on the CPU, so no device sync happens here)."""
        out: dict = {"logit_scale": self.logit_scale.exp()}
        if images is not None:
            out["image_features"] = self.encode_image(images, normalize=True)
        if tokens is not None:
            out["text_features"] = self.encode_text(tokens, normalize=True, trim=trim)
        return out

    @torch.no_grad()
    def forward_intermediates(self, images: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                              attn_layers: tuple[int, ...] | list[int] = ()) -> dict:
        """Per-layer hidden states, pooled tokens and (for `attn_layers`) attention maps, computed by
        this very model (the attention path is the explicit-softmax twin of the fused one)."""
        attn_layers = tuple(attn_layers)
        out: dict = {}
        if images is not None:
            col: dict = {}
            self._image_tokens(images, col, attn_layers)
            out["image_hidden"] = col.get("hidden", [])
            out["image_pooled"] = [h[:, 0] for h in out["image_hidden"]]
            out["image_layers"] = col.get("layers", [])
            out["image_attn"] = col.get("attn", {})
        if tokens is not None:
            col = {}
            self._text_tokens(tokens, col, attn_layers)
            eot = tokens.argmax(dim=-1)
            rows = torch.arange(tokens.shape[0], device=tokens.device)
            out["text_hidden"] = col.get("hidden", [])
            out["text_pooled"] = [h[rows, eot] for h in out["text_hidden"]]
            out["text_layers"] = col.get("layers", [])
            out["text_attn"] = col.get("attn", {})
        return out

    # ------------------------------------------------------------------ utilities
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.grad_checkpointing = enable

    def param_modality(self) -> dict[str, str]:
        """Each named parameter -> "shared" | "image" | "text" | "other"."""
        out = {}
        for name, _ in self.named_parameters():
            if ".shared." in name:
                out[name] = "shared"
            elif name.startswith("image.") or ".image." in name:
                out[name] = "image"
            elif name.startswith("text.") or ".text." in name:
                out[name] = "text"
            else:
                out[name] = "other"
        return out

    def parameter_counts(self) -> dict[str, int]:
        counts = {"shared": 0, "image": 0, "text": 0, "other": 0}
        params = dict(self.named_parameters())
        for name, group in self.param_modality().items():
            counts[group] += params[name].numel()
        counts["total"] = sum(counts[g] for g in ("shared", "image", "text", "other"))
        counts["image_encoder"] = counts["shared"] + counts["image"]
        counts["text_encoder"] = counts["shared"] + counts["text"]
        return counts

    def no_weight_decay_names(self) -> set[str]:
        """Biases, norm/BN affine parameters, embeddings and the temperature."""
        out = set()
        for name, p in self.named_parameters():
            if p.ndim < 2 or "embedding" in name or name == "logit_scale":
                out.add(name)
        return out

    @torch.no_grad()
    def init_weights(self, fit_batchnorm_stats: bool = True) -> None:
        """Initialisation as in the official MS-CLIP code (the token embedding uses std 0.02 as OpenAI CLIP
        does; the official N(0, 1) is needlessly large), then BatchNorm statistics that fit these weights.

        With std-0.02 convs every conv shrinks its input, and BatchNorm's initial running statistics
        (mean 0, var 1) make it the identity in eval mode, so a random-init MS-CLIP-S evaluated in eval
        mode gives every image the same embedding (16 different images: 1 - mean cosine 6e-8 .. 1e-6 on
        the tiny configs, 4e-3 for full-size msclip-s-b32; the official code is collapsed the same way).
        Training is not affected (train-mode BatchNorm uses batch statistics). `_fit_batchnorm_stats`
        replaces the meaningless initial statistics by those of one seeded noise batch; the weights, and
        so every training step, stay the official ones (measured: He-normal conv weights instead made the
        demo's MS-CLIP-S train worse, final loss 3.66 vs 3.47 after 200 steps).
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in self.trunk.blocks:
            for lin in block.attn_in.values():
                nn.init.xavier_uniform_(lin.weight)
        d = self.cfg.vision.width
        self.image.class_embedding.normal_(0, d ** -0.5)
        self.image.positional_embedding.normal_(0, d ** -0.5)
        self.image.proj.normal_(0, d ** -0.5)
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)
        nn.init.trunc_normal_(self.text.positional_embedding, std=0.02)
        nn.init.trunc_normal_(self.text.proj, std=0.02)
        if fit_batchnorm_stats:  # skipped when weights are about to be loaded (1.3 s for full-size msclip-s-b32)
            self._fit_batchnorm_stats()

    @torch.no_grad()
    def _fit_batchnorm_stats(self, batch: int = 4) -> None:
        """Running statistics of every BatchNorm = its batch statistics on seeded N(0, 1) images (a private
        generator: the global RNG stream, and so the rest of the init, is unchanged). No-op without BN."""
        norms = [m for m in self.image.modules() if isinstance(m, nn.BatchNorm2d)]
        if not norms or self.image.positional_embedding.is_meta:  # nothing to fit / shapes only (meta device)
            return
        size = self.cfg.vision.image_size
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, size, size, generator=g, dtype=self.image.positional_embedding.dtype)
        was_training, momenta = self.training, [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics outright
        self.train()
        try:
            self.encode_image(images)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
                m.num_batches_tracked.zero_()  # as fresh as before: nothing was learned
            self.train(was_training)
