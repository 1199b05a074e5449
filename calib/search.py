"""Exact threshold search: branch and bound over the observed confidences (pure numpy).

The two calibration problems of :mod:`dmpo_edge.calib.thresholds` are combinatorial: a sample leaves at
the first early exit k with ``confidence[k] >= t[k]``, so only the distinct confidences seen at exit k
(plus "nobody leaves") are distinct choices for ``t[k]``, and a K-exit model has up to N^(K-1) threshold
vectors. This module finds the optimum of

- ``budget``:   most right answers with expected cost <= budget (ties: the cheaper), and
- ``max_drop``: least expected cost with at least ``need`` right answers (ties: the more accurate),

on the validation split exactly, with three devices that keep it to seconds for the models' 3-5 exits and a
few thousand samples:

1. the last two thresholds are solved together on a grid: with samples ranked by their confidence at both
   exits, every (t[K-3], t[K-2]) pair's exit counts and right answers are 2-D prefix sums;
2. dominance: when the next confidence group at exit k (the most confident samples that do not leave yet)
   is right at exit k, letting it leave too can only add right answers and remove FLOPs, whatever the
   later thresholds are, so cuts are only taken just above a group holding a wrong answer;
3. the thresholds in front of the grid are enumerated best bound first and pruned with a relaxation that
   lets every remaining sample pick its exit freely (each one's choices are "the next exit" or "its first
   right exit": a multiple-choice knapsack whose LP bound is a greedy fill by FLOPs).

If the search would evaluate more than ``max_cells`` grid cells it stops, keeps the best point found and
reports the gap to the bound of what it did not explore (``optimal`` false), so a caller can say so.
Costs are summed exit by exit in the order :func:`flops_sum` uses, the same arithmetic as
``evaluate_thresholds``, so a budget met here is met there bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..policies import NEVER_EXIT

__all__ = ["flops_sum", "SearchResult", "exact_search", "DEFAULT_MAX_CELLS"]

# Grid cells (threshold pairs of the last two early exits) the search may evaluate: about 20-40 s on one free core.
DEFAULT_MAX_CELLS = 200_000_000
# Rows of a leaf grid evaluated at once (bounds memory: ~ rows x groups x 8 bytes per array).
_BLOCK_CELLS = 2_000_000
# Relative slack for float comparisons inside bounds (bounds must never cut a true candidate).
_TOL = 1e-9


def flops_sum(counts, flops):
    """Sum over exits of ``counts[k] * flops[k]``, left to right: one rounding order for scalars and grids alike."""
    acc = 0.0
    for c, f in zip(counts, flops):
        acc = acc + np.asarray(c, np.float64) * float(f) if isinstance(c, np.ndarray) else acc + float(c) * float(f)
    return acc


@dataclass
class SearchResult:
    thresholds: np.ndarray
    correct: int
    cost_sum: float
    optimal: bool
    bound: float  # budget: most right answers any point could reach; max_drop: least FLOPs sum any point could cost
    cells: int  # grid cells evaluated
    nodes: int  # threshold prefixes expanded


def _groups(values: np.ndarray):
    """Distinct values in descending order and each sample's group (NaN: an extra last group that never leaves)."""
    finite = ~np.isnan(values)
    uniq, inv = np.unique(-values[finite], return_inverse=True)
    g = np.full(values.shape, uniq.size, np.int64)
    g[finite] = inv.reshape(-1)
    return -uniq, g  # group values (descending), group per sample


def _cut_options(g: np.ndarray, num_groups: int, right: np.ndarray) -> np.ndarray:
    """Options j (the top j groups leave) worth trying: j = 0, j = all, and every j whose next group has a wrong answer.

    If group j holds only right answers, option j + 1 is at least as good as option j for any later thresholds.
    """
    wrong = np.bincount(g[~right], minlength=num_groups + 1)[:num_groups] > 0
    return np.unique(np.r_[0, np.flatnonzero(wrong), num_groups]).astype(np.int64)


class _Search:
    def __init__(self, conf, corr, flops, mode, limit, need, max_cells):
        self.conf, self.corr, self.flops = conf, corr, np.asarray(flops, np.float64)
        self.k_stages, self.n = conf.shape
        self.mode, self.limit, self.need = mode, limit, need
        self.max_cells = max_cells
        self.full = float(self.flops[-1])
        # budget as a FLOPs sum, for bounds only (the exact test is done in the leaves)
        self.cap = limit * self.n * self.full * (1 + _TOL) if mode == "budget" else None
        self.best = None  # (key, thresholds, correct, cost_sum)
        self.cells = 0
        self.nodes = 0
        self.stopped = False
        self.open_bound = None  # best bound among prefixes left unexplored

    # -- keys: higher is better ------------------------------------------------------------------------------
    def key(self, correct, cost):
        return (correct, -cost) if self.mode == "budget" else (-cost, correct)

    def offer(self, correct: int, cost: float, thresholds) -> None:
        if self.mode == "budget":
            ok = (cost / self.n) / self.full <= self.limit
        else:
            ok = correct >= self.need
        if ok and (self.best is None or self.key(correct, cost) > self.best[0]):
            self.best = (self.key(correct, cost), np.asarray(thresholds, np.float64).copy(), int(correct), float(cost))

    def hopeless(self, ub_correct: int, lb_cost: float) -> bool:
        """Can no point with at most ``ub_correct`` right answers and at least ``lb_cost`` FLOPs beat the incumbent?"""
        if self.mode == "budget":
            if lb_cost > self.cap:
                return True
            if self.best is None:
                return False
            inc_correct, inc_cost = self.best[2], self.best[3]
            return ub_correct < inc_correct or (ub_correct == inc_correct and lb_cost > inc_cost * (1 + _TOL))
        if ub_correct < self.need:
            return True
        return self.best is not None and lb_cost > self.best[3] * (1 + _TOL)

    def note_open(self, ub_correct: int, lb_cost: float) -> None:
        """Record the bound of a prefix the search had no budget left to explore."""
        self.stopped = True
        b = ub_correct if self.mode == "budget" else lb_cost
        if self.open_bound is None:
            self.open_bound = b
        else:
            self.open_bound = max(self.open_bound, b) if self.mode == "budget" else min(self.open_bound, b)

    # -- bounds for every option at one exit, vectorised -------------------------------------------------------
    def option_bounds(self, k, idx, g, num_groups, opts, base_correct, base_cost):
        """Upper bound on right answers and lower bound on FLOPs of each option at exit k (samples ``idx`` reach k).

        After option j the samples of groups >= j go on to exits k+1.. and may each take any of them (relaxation).
        """
        flops, corr = self.flops, self.corr
        ks = self.k_stages
        nxt = k + 1
        right_k = corr[k, idx]
        # class of each sample if it goes on: 0 = right at k+1, e - nxt = first right exit e > k+1, last = never right
        later = corr[nxt:, idx]
        any_right = later.any(axis=0)
        first = np.where(any_right, later.argmax(axis=0), ks - nxt)
        # per group: leaving count and right answers at k; going-on class counts
        gg = num_groups + 1
        n_g = np.bincount(g, minlength=gg)
        r_g = np.bincount(g, weights=right_k, minlength=gg)
        nc = ks - nxt + 1
        cls = np.bincount(g * nc + first, minlength=gg * nc).reshape(gg, nc).astype(np.float64)
        # prefixes (leaving at k) and suffixes (going on) at each option j
        n_leave = np.r_[0, np.cumsum(n_g)][opts]
        r_leave = np.r_[0, np.cumsum(r_g)][opts]
        suf = np.vstack([np.cumsum(cls[::-1], axis=0)[::-1], np.zeros((1, cls.shape[1]))])[opts]  # (options, classes)
        m_on = suf.sum(axis=1)
        fixed_correct = base_correct + r_leave
        fixed_cost = base_cost + n_leave * flops[k]
        v0 = suf[:, 0]
        cost0 = fixed_cost + m_on * flops[nxt]
        ub = fixed_correct + v0 + suf[:, 1 : ks - nxt].sum(axis=1)  # ignoring cost
        if self.mode == "budget":
            slack = self.cap - cost0
            gain = np.zeros_like(slack)
            s = slack.copy()
            for c in range(1, ks - nxt):
                d = flops[nxt + c] - flops[nxt]
                take = suf[:, c] if d <= 0 else np.clip(np.minimum(suf[:, c], np.maximum(s, 0) / d), 0, None)
                gain += take
                s -= take * max(d, 0.0)
            ub = np.minimum(ub, np.floor(fixed_correct + v0 + gain + 1e-7))
            return ub.astype(np.int64), cost0 * (1 - _TOL)
        deficit = self.need - (fixed_correct + v0)
        extra = np.zeros_like(cost0)
        left = np.maximum(deficit, 0).astype(np.float64)
        for c in range(1, ks - nxt):
            d = flops[nxt + c] - flops[nxt]
            take = np.minimum(suf[:, c], left)
            extra += take * d
            left -= take
        lb = np.where(left > 0, np.inf, (cost0 + extra) * (1 - _TOL))
        return ub.astype(np.int64), lb

    # -- the search --------------------------------------------------------------------------------------------
    def run(self, idx, k, prefix, base_counts, base_correct):
        """Explore every threshold vector extending ``prefix`` (thresholds of exits < k) for the samples ``idx``."""
        if self.k_stages - 1 - k == 1:  # a single early exit left (2-exit models)
            self.leaf_1d(idx, k, prefix, base_counts, base_correct)
            return
        if self.k_stages - 1 - k == 2:
            self.leaf_grid(idx, k, prefix, base_counts, base_correct)
            return
        self.nodes += 1
        vals, g = _groups(self.conf[k, idx])
        opts = _cut_options(g, vals.size, self.corr[k, idx])
        base_cost = flops_sum(base_counts, self.flops)
        ub, lb = self.option_bounds(k, idx, g, vals.size, opts, base_correct, base_cost)
        order = np.lexsort((lb, -ub)) if self.mode == "budget" else np.lexsort((-ub, lb))
        for o in order:
            j = int(opts[o])
            if self.hopeless(int(ub[o]), float(lb[o])):
                continue
            if self.cells >= self.max_cells:
                self.note_open(int(ub[o]), float(lb[o]))
                continue
            leave = g < j
            counts = list(base_counts)
            counts[k] = int(leave.sum())
            t = list(prefix) + [NEVER_EXIT if j == 0 else float(vals[j - 1])]
            self.run(idx[~leave], k + 1, t, counts, base_correct + int(self.corr[k, idx[leave]].sum()))

    def leaf_1d(self, idx, k, prefix, base_counts, base_correct):
        last = self.k_stages - 1
        vals, g = _groups(self.conf[k, idx])
        opts = _cut_options(g, vals.size, self.corr[k, idx])
        gg = vals.size + 1
        n_cum = np.r_[0, np.cumsum(np.bincount(g, minlength=gg))]
        rk = np.r_[0, np.cumsum(np.bincount(g, weights=self.corr[k, idx], minlength=gg))]
        rl = np.r_[0, np.cumsum(np.bincount(g, weights=self.corr[last, idx], minlength=gg))]
        n_k = n_cum[opts]
        correct = base_correct + rk[opts] + (rl[-1] - rl[opts])
        counts = list(base_counts)
        counts[k] = n_k
        counts[last] = idx.size - n_k
        cost = flops_sum([np.asarray(c) if isinstance(c, np.ndarray) else c for c in counts], self.flops)
        self.cells += opts.size
        self._pick(correct.astype(np.int64), np.broadcast_to(cost, correct.shape),
                   lambda i: list(prefix) + [NEVER_EXIT if opts[i] == 0 else float(vals[opts[i] - 1])])

    def leaf_grid(self, idx, a, prefix, base_counts, base_correct):
        """Exits a and b = a + 1 are the last early ones: every (t[a], t[b]) pair at once."""
        b, c = a + 1, a + 2
        corr = self.corr
        va, ga = _groups(self.conf[a, idx])
        vb, gb = _groups(self.conf[b, idx])
        oa = _cut_options(ga, va.size, corr[a, idx])
        ob = _cut_options(gb, vb.size, corr[b, idx])
        m = idx.size
        # only the cut options matter: pool the samples into bins between consecutive options (bin i of axis a holds
        # the groups oa[i] <= g < oa[i + 1]), so option i lets bins < i leave
        ba = np.searchsorted(oa, ga, side="right") - 1
        bb = np.searchsorted(ob, gb, side="right") - 1
        na, nb = oa.size, ob.size
        n_a = np.r_[0, np.cumsum(np.bincount(ba, minlength=na))][:na]
        r_a = np.r_[0, np.cumsum(np.bincount(ba, weights=corr[a, idx], minlength=na))][:na]
        # samples by a-bin, deepest first: the samples still in flight at b under row i are a prefix of this order
        by_a = np.argsort(-ba, kind="stable")
        ba_s, bb_s = ba[by_a], bb[by_a]
        w_b, w_c = corr[b, idx[by_a]].astype(np.float64), corr[c, idx[by_a]].astype(np.float64)
        rows_per_block = max(1, _BLOCK_CELLS // max(1, nb))
        # rows (options at exit a) best bound first; a row is skipped when its relaxation cannot beat the incumbent
        ub, lb = self.option_bounds(a, idx, ga, va.size, oa, base_correct, flops_sum(base_counts, self.flops))
        order = np.lexsort((lb, -ub)) if self.mode == "budget" else np.lexsort((-ub, lb))
        pos = 0
        while pos < na:
            picked = []
            while pos < na and len(picked) < rows_per_block:
                r = order[pos]
                pos += 1
                if self.hopeless(int(ub[r]), float(lb[r])):
                    continue
                if self.cells + (len(picked) + 1) * nb > self.max_cells:
                    self.note_open(int(ub[r]), float(lb[r]))
                    continue
                picked.append(r)
            if not picked:
                continue
            rows = np.sort(np.asarray(picked, np.int64))[::-1]  # deepest row first: each row's set grows from the last
            # only the picked rows' tables, O(samples + rows x b-bins): sample p joins at the first row whose prefix holds it
            reach = np.searchsorted(-ba_s, -rows, side="right")  # in-flight count per row, increasing
            seg = np.searchsorted(reach, np.arange(m), side="right")
            keep = seg < rows.size
            flat = seg[keep] * nb + bb_s[keep]

            def table(weights):
                """T[j, q]: weight of the samples of a-bins >= rows[j] (in flight at b) in b-bins < q (leave at b)."""
                h = np.bincount(flat, weights=None if weights is None else weights[keep], minlength=rows.size * nb)
                h = np.cumsum(np.cumsum(h.reshape(rows.size, nb), axis=0), axis=1)
                return np.hstack([np.zeros((rows.size, 1)), h])  # rows x (nb + 1); column nb = row total

            nb_, tb, tc = table(None), table(w_b), table(w_c)
            rc = tc[:, -1:] - tc[:, :nb]
            correct = np.rint(base_correct + r_a[rows][:, None] + tb[:, :nb] + rc).astype(np.int64)
            counts = list(base_counts)
            counts[a] = np.broadcast_to(n_a[rows].astype(np.float64)[:, None], (rows.size, nb)).copy()
            counts[b] = np.rint(nb_[:, :nb])
            counts[c] = m - counts[a] - counts[b]
            cost = flops_sum(counts, self.flops)
            self.cells += correct.size

            def thr(i, rows=rows):
                r, q = divmod(int(i), ob.size)
                ja, jb = int(oa[rows[r]]), int(ob[q])
                return list(prefix) + [NEVER_EXIT if ja == 0 else float(va[ja - 1]), NEVER_EXIT if jb == 0 else float(vb[jb - 1])]

            self._pick(correct.reshape(-1), cost.reshape(-1), thr)

    def _pick(self, correct, cost, thresholds_of):
        if self.mode == "budget":
            ok = (cost / self.n) / self.full <= self.limit
            if not ok.any():
                return
            best_c = correct[ok].max()
            cand = np.flatnonzero(ok & (correct == best_c))
            i = cand[np.argmin(cost[cand])]
        else:
            ok = correct >= self.need
            if not ok.any():
                return
            best_cost = cost[ok].min()
            cand = np.flatnonzero(ok & (cost == best_cost))
            i = cand[np.argmax(correct[cand])]
        if self.best is None or self.key(int(correct[i]), float(cost[i])) > self.best[0]:
            self.offer(int(correct[i]), float(cost[i]), thresholds_of(i))


def exact_search(conf, corr, flops, mode: str, limit: float | None = None, need: int | None = None,
                 incumbents=(), max_cells: int = DEFAULT_MAX_CELLS) -> SearchResult:
    """Optimum of ``mode`` ("budget" with ``limit`` = cost fraction, or "max_drop" with ``need`` = right answers).

    ``incumbents``: threshold vectors to start from (e.g. the budgeted-batch sweep); they only speed up pruning.
    """
    s = _Search(np.asarray(conf), np.asarray(corr, bool), flops, mode, limit, need, max_cells)
    k_stages, n = s.conf.shape
    from .thresholds import assign_exits  # the exit rule itself, for the starting points

    for t in incumbents:
        ex = assign_exits(s.conf, t)
        counts = np.bincount(ex, minlength=k_stages)
        s.offer(int(s.corr[ex, np.arange(n)].sum()), flops_sum([int(x) for x in counts], s.flops), t)
    s.run(np.arange(n), 0, [], [0] * k_stages, 0)
    if s.best is None:
        return SearchResult(np.full(k_stages - 1, NEVER_EXIT), 0, float("nan"), not s.stopped,
                            float("nan") if s.open_bound is None else float(s.open_bound), s.cells, s.nodes)
    _, t, correct, cost = s.best
    if s.stopped and s.open_bound is not None:
        better_left = s.open_bound > correct if mode == "budget" else s.open_bound < cost * (1 - _TOL)
    else:
        better_left = False
    bound = (correct if mode == "budget" else cost) if not better_left else s.open_bound
    return SearchResult(t, correct, cost, not better_left, float(bound), s.cells, s.nodes)
