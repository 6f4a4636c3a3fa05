"""Kyutai's reference `moshi` package for `bench.fidelity`: loading a checkpoint in a chosen dtype,
and its LM stepped one frame at a time with each stream's logits exposed and its tokens forced.

The reference's `LMGen` samples inside its step and offers no way to impose a token, so the step is
driven here from `LMModel`'s own public pieces (`forward_text`, `forward_depformer`, in the order
`LMGen._step` and `LMGen.depformer_step` call them); only the acoustic delays are applied here, as
`LMGen` applies them. Choosing every token greedily reproduces `LMGen(use_sampling=False)`
(tests/test_bench_fidelity.py checks it), which is how the fp32 oracle runs.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from engine.config import MIMI_NAME, MOSHI_NAME, TOKENIZER_NAME, ConfigError

# The reference torch.compiles its norms, gating and RoPE unless told not to: minutes per shape on
# CPU, and inductor's fused kernels would round differently from the eager ops measured here.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

CONFIG_KEYS_NOT_LM = ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "model_type", "lora_name",
                      "lm_gen_config")


def load_reference(model_dir: Path, dtype: torch.dtype, device: torch.device | str):
    """(Mimi in float32, the LM in `dtype`), as kyutai's server loads a checkpoint directory: a LoRA
    adapter folded in, and no config.json taken for Moshi 7B with the repository's file names."""
    from moshi.models.loaders import CheckpointInfo
    path = model_dir / "config.json"
    raw = json.loads(path.read_text()) if path.exists() else {}
    if raw.get("quantize"):
        raise ConfigError(f"{model_dir} holds int8 (q8) weights, which kyutai's package loads only through "
                          "bitsandbytes; compare the bf16 checkpoint they were made from")
    lm_config = {k: v for k, v in raw.items() if k not in CONFIG_KEYS_NOT_LM} or None
    mimi_config = json.loads((model_dir / raw["mimi_config_name"]).read_text()) if "mimi_config_name" in raw else None
    info = CheckpointInfo(model_dir / raw.get("moshi_name", MOSHI_NAME), model_dir / raw.get("mimi_name", MIMI_NAME),
                          model_dir / raw.get("tokenizer_name", TOKENIZER_NAME), lm_config=lm_config,
                          raw_config=raw or None, mimi_config=mimi_config,
                          lora_weights=model_dir / raw["lora_name"] if raw.get("lora_name") else None)
    mimi = info.get_mimi(device=device).eval()
    return mimi, info.get_moshi(device=device, dtype=dtype).eval()


class StepLogits:
    """One frame's logits (float32, [B, V] text and [B, dep_q, V] audio) and the tokens a greedy
    sampler would take from them ([B, 1 + dep_q], text first)."""

    def __init__(self, text: torch.Tensor, audio: torch.Tensor, top1: torch.Tensor):
        self.text, self.audio, self.top1 = text, audio, top1

    def stream(self, k: int) -> torch.Tensor:
        """Stream k's logits: 0 text, 1.. the audio codebooks."""
        return self.text if k == 0 else self.audio[:, k - 1]


class ReferenceStepper:
    """The reference LM over one batch of sessions, a frame per `step`. Use as a context manager
    (it holds the LM's streaming state)."""

    def __init__(self, lm, batch: int):
        self.lm, self.batch = lm, batch
        self.delays = list(lm.delays)
        self.dep_q = lm.dep_q
        self.initial = torch.tensor([lm.text_initial_token_id] + [lm.initial_token_id] * (lm.num_codebooks - 1),
                                    device=lm.device)
        self.generated: list[torch.Tensor] = []  # [B, 1 + dep_q] per past frame
        self.user: list[torch.Tensor] = []  # [B, n_user] per past frame
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "ReferenceStepper":
        self._stack.enter_context(torch.no_grad())
        self._stack.enter_context(self.lm.streaming(self.batch))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _inputs(self) -> torch.Tensor:
        """[B, K] input tokens of the frame about to be stepped: a stream reads its initial token
        until the frame index passes its delay; then a generated stream (text, the model's audio)
        reads what was chosen one frame back, and a user stream the user's code `delay` frames back."""
        t = len(self.user) - 1
        inputs = self.initial.expand(self.batch, -1).clone()
        for k, delay in enumerate(self.delays):
            if t <= delay:
                continue
            if k <= self.dep_q:
                inputs[:, k] = self.generated[t - 1][:, k]
            else:
                inputs[:, k] = self.user[t - delay][:, k - self.dep_q - 1]
        return inputs

    def step(self, user_codes: torch.Tensor, forced: torch.Tensor | None = None) -> StepLogits:
        """user_codes [B, n_user] for this frame; `forced` [B, 1 + dep_q]: the tokens every stream
        goes on with (None: greedy, as `LMGen(use_sampling=False)`)."""
        from moshi.utils.sampling import sample_token
        lm = self.lm
        self.user.append(user_codes.to(self.initial.device))
        transformer_out, text_logits = lm.forward_text(self._inputs()[:, :, None])
        logits = [text_logits.reshape(self.batch, -1).float()]
        top1 = [sample_token(logits[0], use_sampling=False)]
        chosen = [top1[0] if forced is None else forced[:, 0]]
        with lm.depformer.streaming(self.batch):
            for cb in range(self.dep_q):
                out = lm.forward_depformer(cb, chosen[-1][:, None, None], transformer_out)
                logits.append(out.reshape(self.batch, -1).float())
                top1.append(sample_token(logits[-1], use_sampling=False))
                chosen.append(top1[-1] if forced is None else forced[:, cb + 1])
        self.generated.append(torch.stack(chosen, dim=1))
        return StepLogits(logits[0], torch.stack(logits[1:], dim=1), torch.stack(top1, dim=1))
