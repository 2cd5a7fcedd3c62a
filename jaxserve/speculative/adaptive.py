"""When does speculation pay? Acceptance per request and globally, measured step costs, expected speedup.

Model (Leviathan et al. 2023, sec. 3.4): if each draft token is accepted with probability a (independently),
a step that verifies k drafts emits E(a, k) = (1 - a^(k+1)) / (1 - a) tokens. A speculative step costs
verify(R) + k x draft(R) seconds against decode(R) for one token per row, all measured on this machine (timed
at start-up, then exponential moving averages of real steps). Per step the controller picks the k that
maximises expected tokens per second over the batch; it switches speculation off for a request whose own
expected speedup is below `min_speedup`, and for the whole step when the batch's is.

A request with no history starts from the global acceptance (all requests' recent drafts), so once drafts
have stopped paying, new requests start with speculation off. A request that is off is re-probed after
`probe_every` decode steps; every probe that does not bring some request back on doubles that interval (up to
`max_probe_interval`), and any request running with speculation on resets it, so a proposer that never pays
(e.g. a self-draft the target disagrees with) costs a handful of verify steps in all, not one every 16 steps
per request.
"""

from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(a: float, k: int) -> float:
    """Tokens one verify step emits for per-token acceptance a and k drafts (the bonus/correction included)."""
    if k <= 0:
        return 1.0
    if a >= 1.0:
        return k + 1.0
    return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass
class _SeqStats:
    succ: float = 0.0  # decayed accepted drafts
    trials: float = 0.0  # decayed acceptance trials (accepted + first rejection)
    off_steps: int = 0


class AdaptiveController:
    PRIOR_A, PRIOR_W = 0.6, 1.0  # before any draft was checked: as if 1 trial at 60 % acceptance had been seen
    DECAY = 0.9  # a request's acceptance memory: about 10 trials
    GLOBAL_DECAY = 0.98  # the global acceptance's memory: about 50 trials

    def __init__(self, max_k: int, enabled: bool = True, min_speedup: float = 1.0, probe_every: int = 16,
                 max_probe_interval: int = 1024):
        self.max_k = max_k
        self.enabled = enabled
        self.min_speedup = min_speedup
        self.probe_every = probe_every
        self.max_probe_interval = max_probe_interval
        self.probe_interval = probe_every
        self.g_succ = 0.0  # decayed accepted drafts, all requests
        self.g_trials = 0.0
        self.seqs: dict = {}
        self.decode_s: dict = {}  # R -> seconds per decode step
        self.verify_s: dict = {}  # R -> seconds per verify step

    # ---------------------------------------------------------------- costs
    def observe_cost(self, kind: str, R: int, seconds: float, init: bool = False) -> None:
        d = self.decode_s if kind == "decode" else self.verify_s
        d[R] = seconds if (init or R not in d) else 0.8 * d[R] + 0.2 * seconds

    def speedup(self, accepts: list, k: int, R: int, draft_s: float) -> float:
        """Expected tokens/s with k drafts per row over tokens/s without (rows' acceptances `accepts`)."""
        dec, ver = self.decode_s.get(R), self.verify_s.get(R)
        if not dec or not ver or not accepts:
            return float("inf")
        tok = sum(expected_tokens(a, k) for a in accepts)
        return (tok / (ver + k * draft_s)) / (len(accepts) / dec)

    # ---------------------------------------------------------------- acceptance
    def global_acceptance(self) -> float:
        return (self.g_succ + self.PRIOR_A * self.PRIOR_W) / (self.g_trials + self.PRIOR_W)

    def acceptance(self, seq_id: int) -> float:
        """The request's decayed acceptance, with the global acceptance as its prior (one trial's weight)."""
        st = self.seqs.get(seq_id)
        succ, trials = (st.succ, st.trials) if st else (0.0, 0.0)
        return (succ + self.global_acceptance() * self.PRIOR_W) / (trials + self.PRIOR_W)

    def observe(self, seq_id: int, k: int, accepted: int) -> None:
        st = self.seqs.setdefault(seq_id, _SeqStats())
        trials = accepted + (1 if accepted < k else 0)
        st.succ = self.DECAY * st.succ + accepted
        st.trials = self.DECAY * st.trials + trials
        self.g_succ = self.GLOBAL_DECAY * self.g_succ + accepted
        self.g_trials = self.GLOBAL_DECAY * self.g_trials + trials

    def forget(self, seq_id: int) -> None:
        self.seqs.pop(seq_id, None)

    # ---------------------------------------------------------------- decisions
    def plan(self, seq_ids: list, R: int, draft_s: float, max_k: int = None) -> list:
        """Draft length per row (0 = do not speculate for it this step)."""
        K = self.max_k if max_k is None else max_k
        if not self.enabled or K <= 0:
            return [K] * len(seq_ids)
        on, probing, paying = [], False, False
        for sid in seq_ids:
            st = self.seqs.setdefault(sid, _SeqStats())
            if self.speedup([self.acceptance(sid)], K, R, draft_s) >= self.min_speedup:
                st.off_steps = 0
                on.append(True)
                paying = True
                continue
            st.off_steps += 1
            probe = st.off_steps >= self.probe_interval  # acceptance may have changed: try again now and then
            if probe:
                st.off_steps = 0
                probing = True
            on.append(probe)
        if paying:
            self.probe_interval = self.probe_every
        elif probing:
            self.probe_interval = min(2 * self.probe_interval, self.max_probe_interval)
        n = len(seq_ids)
        accepts = [self.acceptance(s) for s, o in zip(seq_ids, on) if o]
        if not accepts:
            return [0] * n
        dec, ver = self.decode_s.get(R), self.verify_s.get(R)
        best_k, best = 0, 1.0
        if not dec or not ver:
            best_k = K
        else:
            for k in range(1, K + 1):
                # rows not speculating still emit one token per (more expensive) verify step
                tok = sum(expected_tokens(a, k) for a in accepts) + (n - len(accepts))
                sp = (tok / (ver + k * draft_s)) / (n / dec)
                if sp > best:
                    best_k, best = k, sp
            if best < self.min_speedup:
                best_k = 0
        if best_k == 0 and probing:
            best_k = K
        return [best_k if o else 0 for o in on]
