"""Executes one batched frame step for a set of slots: Mimi encode -> LM -> Mimi decode."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from engine.capacity import check_device, check_weights_fit
from engine.checkpoint import CheckpointFiles, load_weights, resolve
from engine.config import EngineConfig, KVConfig, SamplingConfig
from engine.graphs import GraphedStep, buckets_for
from engine.kv.pool import KVPool
from engine.kv.sizing import plan_state
from engine.lm import MoshiLM
from engine.lm_gen import LMGen
from engine.lora import LoraSpec
from engine.mimi import Mimi
from engine.profiling import StageTimer
from engine.slots import SlotTable
from engine.tokenizer import TextTokenizer
from kernels.dispatch import apply_backend, resolve_backend
from kernels.linear import prepack
from kernels.stack_cpu import attach as attach_cpu_stacks


@dataclass
class StepOutput:
    """Host-side results of one step, rows in the order of the stepped slots."""
    ready: list[bool]  # False while a session is inside the LM's initial delay
    text_tokens: list[int]
    audio_tokens: list[list[int]]
    pcm: dict[int, torch.Tensor]  # slot -> [frame_size] float32 for ready rows


class ModelRunner:
    def __init__(self, lm: MoshiLM, mimi: Mimi, tokenizer: TextTokenizer, max_sessions: int,
                 kernels: str = "auto", use_cuda_graphs: bool = True, batch_invariant: bool = False,
                 lora: LoraSpec | None = None, default_sampling: SamplingConfig = SamplingConfig(),
                 kv: KVConfig = KVConfig()):
        self.lm = lm.eval()
        self.lora = lora  # the adapter folded into `lm`'s weights at load, for the start-up line
        # What a session that names no sampling settings gets: the checkpoint's lm_gen_config.
        self.default_sampling = default_sampling
        self.mimi = mimi.eval()
        self.kernel_backend = resolve_backend(kernels, next(lm.parameters()).device)
        apply_backend(lm, self.kernel_backend)
        apply_backend(mimi, self.kernel_backend)
        prepack(lm)
        prepack(mimi)
        attach_cpu_stacks(lm)
        attach_cpu_stacks(mimi)
        self.tokenizer = tokenizer
        self.device = next(lm.parameters()).device
        # Slots and KV pages (0 slots: as many as fit), sized once the weights (and on CPU their
        # packed copies) are in place.
        kv_dtype = kv.torch_dtype(next(lm.parameters()).dtype)
        self.kv_plan = plan_state(lm, mimi, kv.validate(), kv_dtype, max_sessions, self.device)
        self.max_sessions = self.kv_plan.slots
        if self.device.type == "cuda":
            # Streams and graphs are made on the thread's current device: make it the model's
            # (`--device cuda:1`), for the thread that builds the runner and then ticks it.
            torch.cuda.set_device(self.device)
        self.frame_size = mimi.frame_size
        self.max_delay = lm.cfg.max_delay
        # One state row past the sessions' is scratch: padded rows and decodes that must not count.
        self.scratch_slot = self.max_sessions
        mimi.set_num_codebooks(lm.cfg.mimi_codebooks)
        mimi.init_state(self.max_sessions + 1)
        t = lm.transformer
        self.kv = KVPool(len(t.layers), t.num_heads, t.head_dim, lm.cfg.context, slots=self.max_sessions + 1,
                         pages=self.kv_plan.pages, page_size=kv.page_size, dtype=kv_dtype, device=self.device,
                         policy=kv.policy, min_positions=kv.min_positions)
        self.gen = LMGen(lm, self.max_sessions + 1, self.kv)
        self.slots = SlotTable(self.max_sessions + 1, self.device, (lm.cfg.card, lm.cfg.text_card))
        # Batched arithmetic rounds by the batch's shape (a product's rows by the row count, CPU
        # attention by the longest history it spans, topk's ties by k), so a session's bits depend
        # on its neighbours unless every step has one shape: all rows, whole rings, whole vocabulary.
        self.batch_invariant = batch_invariant
        self.buckets = [self.max_sessions] if batch_invariant else buckets_for(self.max_sessions)
        for t in self.rings():
            t.whole_ring = batch_invariant
        self.timer = StageTimer(self.device)
        self.graphs = GraphedStep(self) if self.device.type == "cuda" and use_cuda_graphs else None

    @staticmethod
    def load(cfg: EngineConfig, files: CheckpointFiles | None = None) -> "ModelRunner":
        cfg.validate()
        check_device(cfg.device)
        files = files or resolve(cfg)
        with torch.device("meta"):
            lm = MoshiLM(files.lm)
            mimi = Mimi(files.mimi)
        # The adapter's file is read whole beside the LM's.
        file_bytes = files.moshi_weights.stat().st_size + (files.lora.path.stat().st_size if files.lora else 0)
        check_weights_fit(lm, mimi, cfg.torch_dtype, cfg.device, file_bytes)
        load_weights(lm, files.moshi_weights, cfg.torch_dtype, cfg.device, files.lora)
        # Mimi stays in fp32 whatever the LM dtype, as in kyutai's server.
        load_weights(mimi, files.mimi_weights, torch.float32, cfg.device)
        tokenizer = TextTokenizer(files.tokenizer)
        if tokenizer.vocab_size < files.lm.text_card:  # its text tokens past the tokenizer's would print as nothing
            print(f"lockstep: the text tokenizer {files.tokenizer} has {tokenizer.vocab_size} pieces, fewer than the "
                  f"LM's {files.lm.text_card} text tokens (config.json's text_card); is it this model's?",
                  file=sys.stderr)
        return ModelRunner(lm, mimi, tokenizer, cfg.max_sessions, cfg.kernels,
                           batch_invariant=cfg.batch_invariant, lora=files.lora, default_sampling=files.sampling,
                           kv=cfg.kv)

    def rings(self) -> tuple:
        """The streaming transformers whose ring spans a call's history (not restarted each frame,
        as the depth transformer is): the LM's and Mimi's two."""
        return (self.lm.transformer, self.mimi.encoder_transformer.transformer,
                self.mimi.decoder_transformer.transformer)

    def join(self, slot: int, sampling: SamplingConfig, owner=None) -> None:
        """Starts a fresh session in `slot`; other slots are untouched. Its KV pages go to `owner`
        (the session, promised its minimum when admitted: `kv.admit`), or to the slot itself; a pool
        that cannot promise the minimum raises `engine.kv.pages.PoolFull`."""
        if not 0 <= slot < self.max_sessions:
            raise ValueError(f"slot {slot} out of range 0..{self.max_sessions - 1}")
        self.slots.assign(slot, sampling)
        self.kv.join(slot, ("slot", slot) if owner is None else owner)
        idx = torch.tensor([slot], device=self.device)
        self.mimi.reset(idx)
        self.gen.reset(idx)

    def leave(self, slot: int) -> None:
        """The slot's session ended: its KV pages go back to the pool (the next join resets the rest)."""
        self.kv.leave(slot)

    def fill_context(self, slots: list[int]) -> None:
        """Puts joined `slots` as if deep into a long call, for the benchmarks and the capacity
        probe: every ring (the LM's and Mimi's two) holds a whole context of history (the LM's as
        much as an elastic pool lets them grow together), and the initial delay is past, so a step
        costs what it costs in the steady state of long calls."""
        for p in range(0, self.lm.cfg.context + 1, self.kv.page_size):
            for s in slots:
                self.kv.fill(s, p)
        for s in slots:
            self.kv.fill(s, self.lm.cfg.context)
        idx = torch.tensor(slots, device=self.device)
        for t in self.rings():
            t.offsets[idx] = t.capacity
        for s in slots:
            self.slots.frames[s] = self.lm.cfg.context

    @torch.no_grad()
    def forward(self, idx: torch.Tensor, decode_idx: torch.Tensor, pcm: torch.Tensor, k_audio: int,
                k_text: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The device part of a step, free of host syncs (graph-capturable): pcm [B, frame_size] for
        slots `idx` -> (tokens [B, 1 + dep_q], pcm [B, frame_size]); audio is decoded into
        `decode_idx`'s decoder state (the scratch slot for rows with no output yet)."""
        B = idx.shape[0]
        with self.timer("mimi_encode"):
            codes = self.mimi.encode_step(pcm.view(B, 1, -1), idx)
        tokens, _ = self.gen.step(idx, codes, self.slots.params(idx, k_audio, k_text, self.kernel_backend), self.timer)
        with self.timer("mimi_decode"):
            # Rows without output yet hold -2; any valid code will do for their scratch decode.
            audio = self.mimi.decode_step(tokens[:, 1:].clamp(min=0), decode_idx)
        return tokens, audio[:, 0]

    @torch.no_grad()
    def warm_up(self, bounds: tuple[int, int] | None = None) -> list[int]:
        """Runs the device step once per batch bucket, every row on the scratch slot, so that what a
        first use costs (CUDA-graph capture, Triton compilation, oneDNN primitives) is paid before
        serving rather than inside a tick that sessions wait on; their slots are untouched.
        `bounds`: the (audio, text) top-k settings to prepare for, rounded as a tick rounds them
        (default: the checkpoint's default sampling settings'). Returns the batch sizes run."""
        if bounds is None:
            bounds = (self.default_sampling.top_k, self.default_sampling.text_top_k)
        bounds = (0, 0) if self.batch_invariant else self.slots.bounds_of([bounds])
        sizes = self.buckets
        for B in sorted(sizes, reverse=True):  # the largest graph first sizes the shared memory pool
            if self.graphs is not None:
                self.graphs.prepare(B, bounds)
            else:
                idx = torch.full((B,), self.scratch_slot, device=self.device, dtype=torch.long)
                self.forward(idx, idx, torch.zeros(B, self.frame_size, device=self.device), *bounds)
        return sizes

    @torch.no_grad()
    def step(self, slots: list[int], pcm: torch.Tensor) -> StepOutput:
        """pcm [B, frame_size] (float32, one frame per slot) -> the slots' next output frame."""
        if len(set(slots)) != len(slots) or not all(0 <= s < self.max_sessions for s in slots):
            raise ValueError(f"slots must be distinct and in 0..{self.max_sessions - 1}: {slots}")
        positions = [self.slots.frames[s] for s in slots]  # the LM's next position in each
        self.kv.prepare(slots, positions)
        ready = [p >= self.max_delay for p in positions]
        decode_host = [s if r else self.scratch_slot for s, r in zip(slots, ready)]
        bounds = (0, 0) if self.batch_invariant else self.slots.top_k_bounds(slots)
        if self.graphs is not None and not self.timer.enabled:
            tokens, audio = self.graphs.run(slots, decode_host, pcm, bounds)
        else:
            B = len(slots)
            # Eager steps run unpadded, except in batch-invariant mode, where every step has the shape
            # of the one bucket (padded rows on the scratch slot, as a graph replay pads them).
            pad = [self.scratch_slot] * (self.buckets[0] - B if self.batch_invariant else 0)
            idx = torch.tensor(slots + pad, device=self.device)
            decode_idx = torch.tensor(decode_host + pad, device=self.device)
            if pad:
                pcm = torch.cat([pcm, pcm.new_zeros(len(pad), pcm.shape[1])])
            tokens, audio = self.forward(idx, decode_idx, pcm.to(self.device, torch.float32), *bounds)
            tokens, audio = tokens[:B], audio[:B]
        for s in slots:
            self.slots.frames[s] += 1
        # A copy: on CPU the static graph buffers would otherwise be shared with the caller.
        tokens, audio = tokens.cpu(), audio.to("cpu", torch.float32, copy=True)
        return StepOutput(ready=ready, text_tokens=tokens[:, 0].tolist(), audio_tokens=tokens[:, 1:].tolist(),
                          pcm={s: audio[i] for i, s in enumerate(slots) if ready[i]})
