"""Moshi LM parity with the reference `moshi` package (fp32, CPU, greedy) on random weights."""
import pytest
import torch

from engine.config import LMConfig
from engine.lm import MoshiLM
from engine.lm_gen import LMGen
from engine.sampling import SamplingParams

moshi_loaders = pytest.importorskip("moshi.models.loaders")
moshi_lm = pytest.importorskip("moshi.models.lm")


def tiny_cfg(context: int) -> LMConfig:
    return LMConfig(dim=64, text_card=100, n_q=16, dep_q=8, card=50, num_heads=4, num_layers=2,
                    context=context, depformer_dim=32, depformer_dim_feedforward=int(4.125 * 32),
                    depformer_num_heads=2, depformer_num_layers=2).validate()


def make_pair(cfg: LMConfig):
    torch.manual_seed(0)
    ref = moshi_loaders.get_moshi_lm(None, lm_kwargs=cfg.to_dict(), device="cpu", dtype=torch.float32)
    for p in ref.parameters():
        # Large random weights so logits are spread out and greedy choices are decisive.
        p.normal_(0, 0.5) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    mine = MoshiLM(cfg).eval()
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), mine


def greedy(B: int) -> SamplingParams:
    z = torch.zeros(B, dtype=torch.long)
    return SamplingParams(greedy=torch.ones(B, dtype=torch.bool), temperature=torch.ones(B), top_k=z,
                          text_temperature=torch.ones(B), text_top_k=z, seeds=z, counters=z, max_top_k=0,
                          max_text_top_k=0)


@pytest.mark.parametrize("context", [7, 3000])
def test_greedy_tokens_match_reference(context):
    cfg = tiny_cfg(context)
    ref, mine = make_pair(cfg)
    B, F = 3, 24
    user = torch.randint(0, cfg.card, (F, B, cfg.n_q - cfg.dep_q))
    gen = LMGen(mine, max_sessions=6)
    slots = torch.tensor([5, 0, 2])
    ref_gen = moshi_lm.LMGen(ref, use_sampling=False)
    got, want = [], []
    with ref_gen.streaming(B):
        for t in range(F):
            r = ref_gen.step(user[t][:, :, None])
            out, ready = gen.step(slots, user[t], greedy(B))
            assert bool(ready.all()) == (r is not None)
            if r is not None:
                want.append(r[:, :, 0])
                got.append(out)
    assert len(got) == F - cfg.max_delay
    assert torch.equal(torch.stack(got), torch.stack(want))


def test_slots_are_independent_of_batch_mates():
    cfg = tiny_cfg(5)
    _, mine = make_pair(cfg)
    F = 12
    user = torch.randint(0, cfg.card, (F, 3, cfg.n_q - cfg.dep_q))
    alone = []
    for b in range(3):
        gen = LMGen(mine, max_sessions=1)
        alone.append(torch.stack([gen.step(torch.tensor([0]), user[t, b:b + 1], greedy(1))[0][0]
                                  for t in range(F)]))
    # Session 0 in slot 3 from the start; session 1 joins slot 1 at frame 4; session 2 reuses
    # slot 3 after session 0 leaves at frame 8 (reset only that slot).
    gen = LMGen(mine, max_sessions=4)
    got = {0: [], 1: [], 2: []}
    for t in range(2 * F):
        active = []
        if t < F:
            active.append((0, 3, t))
        if 4 <= t < F + 4:
            active.append((1, 1, t - 4))
        if t == F:
            gen.reset(torch.tensor([3]))
        if t >= F:
            active.append((2, 3, t - F))
        slots = torch.tensor([s for _, s, _ in active])
        toks = torch.stack([user[f, sid] for sid, _, f in active])
        out, _ = gen.step(slots, toks, greedy(len(active)))
        for row, (sid, _, _) in enumerate(active):
            got[sid].append(out[row])
    for sid in range(3):
        assert torch.equal(torch.stack(got[sid][:F]), alone[sid])


def test_7b_state_dict_matches_reference_on_meta():
    cfg = LMConfig().validate()
    with torch.device("meta"):
        mine = MoshiLM(cfg)
        ref = moshi_loaders.get_moshi_lm(None, lm_kwargs=cfg.to_dict(), device="meta", dtype=torch.bfloat16)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in mine.state_dict().items()}
    assert got == want
