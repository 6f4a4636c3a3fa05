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


class Forcing:
    """A TokenProbe that records what it is shown and makes the step go on with `tokens` (or, with
    None, with what was sampled)."""

    def __init__(self, tokens=None):
        self.tokens, self.seen = tokens, []

    def __call__(self, stream, logits, sampled):
        self.seen.append((stream, logits.clone(), sampled.clone()))
        return sampled if self.tokens is None else self.tokens[:, stream]


def run(lm, user, probes=None):
    """Greedy frames of one LMGen over user [F, B, n_user] (slots B-1..0), with probes[t] at frame t."""
    gen = LMGen(lm, max_sessions=user.shape[1])  # the LM's streaming state is made afresh
    slots = torch.arange(user.shape[1] - 1, -1, -1)
    return [gen.step(slots, user[t], greedy(user.shape[1]), probe=None if probes is None else probes[t])
            for t in range(len(user))]


def test_a_probe_sees_every_stream_and_a_passive_one_changes_nothing():
    cfg = tiny_cfg(7)
    _, mine = make_pair(cfg)
    user = torch.randint(0, cfg.card, (6, 2, cfg.n_q - cfg.dep_q))
    probes = [Forcing() for _ in range(6)]
    for (want, _), (got, _) in zip(run(mine, user), run(mine, user, probes)):
        assert torch.equal(got, want)
    for probe in probes:
        assert [s for s, _, _ in probe.seen] == list(range(cfg.dep_q + 1))
        assert probe.seen[0][1].shape == (2, cfg.text_card) and probe.seen[1][1].shape == (2, cfg.card)
        # What the probe is shown as sampled is the greedy choice of the logits it is shown.
        assert all(torch.equal(sampled, logits.argmax(-1)) for _, logits, sampled in probe.seen)


def test_forced_tokens_are_what_the_step_goes_on_with():
    """Forcing every token to what the free run chose reproduces the free run, logits included; forced
    other tokens are what the step goes on with: the next codebook within the frame sees them, and
    they come out, the delays undone, as the frame's tokens."""
    cfg = tiny_cfg(7)
    _, mine = make_pair(cfg)
    F = 6
    user = torch.randint(0, cfg.card, (F, 1, cfg.n_q - cfg.dep_q))
    recorded = [Forcing() for _ in range(F)]
    free = run(mine, user, recorded)
    chosen = [torch.stack([sampled for _, _, sampled in p.seen], dim=1) for p in recorded]  # [1, 1 + dep_q]
    again = [Forcing(c) for c in chosen]
    for (want, _), (got, _) in zip(free, run(mine, user, again)):
        assert torch.equal(got, want)
    assert all(torch.equal(a[1], b[1]) for p, q in zip(recorded, again) for a, b in zip(p.seen, q.seen))
    imposed = [torch.full((1, cfg.dep_q + 1), 3 + t) for t in range(F)]
    moved = [Forcing(i) for i in imposed]
    out = run(mine, user, moved)
    assert chosen[0][0, 0] != imposed[0][0, 0]
    assert not torch.equal(moved[0].seen[1][1], recorded[0].seen[1][1])  # codebook 1 saw the forced text
    for t in range(cfg.max_delay, F):
        assert out[t][0][0].tolist() == [int(imposed[t - cfg.max_delay + d][0, k])
                                         for k, d in enumerate(cfg.delays[: cfg.dep_q + 1])]
