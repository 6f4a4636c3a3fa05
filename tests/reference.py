"""Runs kyutai's reference `moshi` package on a lockstep-made checkpoint directory."""
import json
from pathlib import Path

import torch

from engine.config import FRAME_SIZE


def load_reference(model_dir: Path, fuse_lora: bool = True):
    """Kyutai's models as its server loads them (a LoRA adapter folded in, unless `fuse_lora` is
    False: then it runs beside each linear layer)."""
    from moshi.models.loaders import CheckpointInfo
    raw = json.loads((model_dir / "config.json").read_text())
    lm_config = dict(raw)
    for key in ("moshi_name", "mimi_name", "tokenizer_name", "mimi_config_name", "model_type", "lora_name",
                "lm_gen_config"):
        lm_config.pop(key, None)
    mimi_config = None
    if "mimi_config_name" in raw:
        mimi_config = json.loads((model_dir / raw["mimi_config_name"]).read_text())
    info = CheckpointInfo(model_dir / raw["moshi_name"], model_dir / raw["mimi_name"],
                          model_dir / raw["tokenizer_name"], lm_config=lm_config, raw_config=raw,
                          mimi_config=mimi_config,
                          lora_weights=model_dir / raw["lora_name"] if raw.get("lora_name") else None)
    return info.get_mimi(device="cpu"), info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=fuse_lora)


def reference_generate(model_dir: Path, frames, fuse_lora: bool = True) -> dict:
    """Greedy generation for one session: frames [F, 1920] float32 -> tokens and pcm per output frame."""
    from moshi.models.lm import LMGen
    mimi, lm = load_reference(model_dir, fuse_lora)
    lm_gen = LMGen(lm, use_sampling=False)
    text, audio, pcm, codes_in = [], [], [], []
    with torch.no_grad(), mimi.streaming(1), lm_gen.streaming(1):
        for frame in frames:
            codes = mimi.encode(torch.as_tensor(frame).view(1, 1, FRAME_SIZE))
            codes_in.append(codes[0, :, 0].tolist())
            tokens = lm_gen.step(codes)
            if tokens is None:
                continue
            text.append(int(tokens[0, 0, 0]))
            audio.append(tokens[0, 1:, 0].tolist())
            pcm.append(mimi.decode(tokens[:, 1:])[0, 0])
    return {"text_tokens": text, "audio_tokens": audio, "codes": codes_in,
            "pcm": torch.cat(pcm) if pcm else torch.zeros(0)}
