"""The transfer matrix of a multi-trait study and its statistics: specificity, profile coefficient, teacher strength,
verdicts.

Data (`TransferData`): one teacher per trait s (the rows), its students over training seeds k, every evaluated answer
a (the columns: every trait plus other candidates), every question q, as log-probabilities:
  student[s, k, a, q]  log P(a | q) under the student of teacher s trained with seed k   [S, K, A, Q]
  base[a, q]           the base model (one, no seeds)                                       [A, Q]
  teacher[s, a, q]     teacher s (optional; `profile_coefficient` and `teacher_strength` need it)  [S, A, Q]
with `traits` (length S) and `answers` (length A, containing every trait) naming the axes. Seed k pairs across traits
(seed k of every teacher's student), question q pairs across every model. Δ is always model − base, same a and q:
Δ_{s,k,q}(a) = student[s,k,a,q] − base[a,q].

Statistics (level 0.95 by default). An interval is a `subl_jax.study.stats.mean_ci` summary {"mean", "ci95", "n"}: a
t-interval, degenerate [mean, mean] when n = 1 (read n first). Every result is a JSON-able dict.
- M[s][a] = mean_{k,q} Δ_{s,k,q}(a). Over seeds: t-interval of the K values mean_q Δ_{s,k,q}(a). Over questions:
  t-interval of the Q values mean_k Δ_{s,k,q}(a).
- spec(t) = M[t][t] − mean_{s≠t} M[s][t] ("other targets" control). Primary interval over seeds: of the K values
  spec_k = mean_q Δ_{t,k,q}(t) − mean_{s≠t} mean_q Δ_{s,k,q}(t). Paired test: the K·Q values
  d_{k,q} = Δ_{t,k,q}(t) − mean_{s≠t} Δ_{s,k,q}(t), a two-sided one-sample t-test of mean 0 (t = mean·√n / sd,
  df = n − 1, p = 2·F_t(−|t|; df)). It treats the K·Q pairs as independent although seeds share the questions, so it
  is the weaker evidence; the interval over seeds is the primary one.
- mean specificity: per seed the mean over targets of spec_k(t), t-interval over seeds (and the paired test of the
  per-(k,q) mean over targets of d_{k,q}(t)).
- profile coefficient: points x_{s,a} = mean_q (teacher_s − base)(a,q), y_{s,a} = M[s][a]; the ordinary
  least-squares slope of y on x (with an intercept), Σ(x − x̄)(y − ȳ) / Σ(x − x̄)², pooled over all S·A points and
  per trait over its A points. Bootstrap: see `profile_coefficient`.
- teacher specificity: per question d_q = (teacher_t − base)(t,q) − mean_{s≠t} (teacher_s − base)(t,q), t-interval
  and t-test over the Q questions (teachers have no seeds).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.special import stdtr  # the t CDF; scipy.stats takes ~1 s to import

from subl_jax.study import stats

PerQuestion = Sequence[float]


@dataclasses.dataclass
class TransferData:
  """Log-probabilities of a multi-trait study (module docstring: axes and meaning); arrays become float64."""
  traits: list[str]
  answers: list[str]
  student: np.ndarray               # [S, K, A, Q]
  base: np.ndarray                  # [A, Q]
  teacher: np.ndarray | None = None  # [S, A, Q]

  def __post_init__(self):
    self.traits, self.answers = list(self.traits), list(self.answers)
    self.student, self.base = np.asarray(self.student, np.float64), np.asarray(self.base, np.float64)
    if self.teacher is not None:
      self.teacher = np.asarray(self.teacher, np.float64)
    for name, labels in (("traits", self.traits), ("answers", self.answers)):
      if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"{name} must be non-empty and unique: {labels}")
    missing = [t for t in self.traits if t not in self.answers]
    if missing:
      raise ValueError(f"traits {missing} are not among the evaluated answers {self.answers}")
    s, a = len(self.traits), len(self.answers)
    if self.student.ndim != 4 or self.student.shape[0] != s or self.student.shape[2] != a:
      raise ValueError(f"student: shape {self.student.shape}, expected [S={s}, K, A={a}, Q]")
    q = self.student.shape[3]
    expected = {"base": (a, q)} | ({} if self.teacher is None else {"teacher": (s, a, q)})
    for name, shape in expected.items():
      if getattr(self, name).shape != shape:
        raise ValueError(f"{name}: shape {getattr(self, name).shape}, expected {shape}")
    for name in ("student", "base") + (() if self.teacher is None else ("teacher",)):
      if not np.all(np.isfinite(getattr(self, name))):
        raise ValueError(f"{name}: non-finite log-probabilities")

  @classmethod
  def from_nested(cls, student: Mapping[str, Sequence[Mapping[str, PerQuestion]]], base: Mapping[str, PerQuestion],
                  teacher: Mapping[str, Mapping[str, PerQuestion]] | None = None,
                  answers: Sequence[str] | None = None) -> "TransferData":
    """From `student = {trait: [seed k: {answer: per-question list}]}`, `base = {answer: per-question list}`,
    `teacher = {trait: {answer: per-question list}}` (the evaluate stage's per_question lists). `answers` defaults
    to the traits, then the base's other answers in order."""
    traits = list(student)
    answers = list(answers) if answers is not None else list(dict.fromkeys(traits + list(base)))
    arr = np.array([[[seed[a] for a in answers] for seed in student[s]] for s in traits], np.float64)
    tch = None if teacher is None else np.array([[teacher[s][a] for a in answers] for s in traits], np.float64)
    return cls(traits, answers, arr, np.array([base[a] for a in answers], np.float64), tch)

  @property
  def n_seeds(self) -> int:
    return self.student.shape[1]

  @property
  def n_questions(self) -> int:
    return self.student.shape[3]

  def delta(self) -> np.ndarray:
    """Δ_{s,k,q}(a) = student − base, [S, K, A, Q]."""
    return self.student - self.base

  def teacher_delta(self) -> np.ndarray:
    """(teacher_s − base)(a, q), [S, A, Q]."""
    if self.teacher is None:
      raise ValueError("this statistic needs the teachers' log-probabilities (TransferData.teacher)")
    return self.teacher - self.base


def ttest(values: Sequence[float] | np.ndarray, level: float = 0.95) -> dict[str, Any]:
  """`stats.mean_ci(values)` plus the two-sided one-sample t-test of mean 0: t, df, p (None when n = 1; with sd 0,
  p = 0 for a non-zero mean and 1 for a zero one)."""
  x = np.asarray(values, np.float64).ravel()
  out = stats.mean_ci(x, level)
  if x.size < 2:
    return out | {"t": None, "df": 0, "p": None}
  sd, mean = float(x.std(ddof=1)), out["mean"]
  t = mean * np.sqrt(x.size) / sd if sd > 0 else (0.0 if mean == 0 else float(np.copysign(np.inf, mean)))
  p = float(2 * stdtr(x.size - 1, -abs(t)))
  return out | {"t": float(t) if np.isfinite(t) else None, "df": int(x.size - 1), "p": p}


def transfer_matrix(data: TransferData, level: float = 0.95) -> dict[str, Any]:
  """M[s][a] with its intervals over seeds and over questions (module docstring); rows = traits, cols = answers."""
  d = data.delta()
  cells = [[(stats.mean_ci(d[s, :, a].mean(axis=1), level), stats.mean_ci(d[s, :, a].mean(axis=0), level))
            for a in range(len(data.answers))] for s in range(len(data.traits))]
  return {"rows": data.traits, "cols": data.answers, "mean": [[c[0]["mean"] for c in row] for row in cells],
          "over_seeds": [[c[0] for c in row] for row in cells],
          "over_questions": [[c[1] for c in row] for row in cells],
          "n_seeds": data.n_seeds, "n_questions": data.n_questions}


def _spec_terms(data: TransferData, target: str) -> tuple[np.ndarray, np.ndarray]:
  """(Δ_{t,k,q}(t) [K, Q], mean_{s≠t} Δ_{s,k,q}(t) [K, Q])."""
  if target not in data.traits:
    raise ValueError(f"target {target!r} has no teacher; traits: {data.traits}")
  if len(data.traits) < 2:
    raise ValueError("specificity needs at least two teachers (the other targets are the control)")
  t, a = data.traits.index(target), data.answers.index(target)
  d = data.delta()[:, :, a]
  return d[t], np.delete(d, t, axis=0).mean(axis=0)


def specificity(data: TransferData, target: str, level: float = 0.95) -> dict[str, Any]:
  """spec(target) = M[t][t] − mean_{s≠t} M[s][t]: the primary interval over seeds ("over_seeds", per seed in
  "per_seed"), the paired t-test over seeds × questions ("paired"), and the own student's Δ on t ("diagonal", with
  its interval over seeds and over questions) against the other teachers' students' ("others")."""
  own, others = _spec_terms(data, target)
  per_seed = own.mean(axis=1) - others.mean(axis=1)
  return {"target": target, "mean": float(per_seed.mean()), "per_seed": per_seed.tolist(),
          "over_seeds": stats.mean_ci(per_seed, level), "paired": ttest(own - others, level),
          "diagonal": {"over_seeds": stats.mean_ci(own.mean(axis=1), level),
                       "over_questions": stats.mean_ci(own.mean(axis=0), level)},
          "others": float(others.mean()), "n_seeds": data.n_seeds, "n_questions": data.n_questions}


def mean_specificity(data: TransferData, targets: Sequence[str] | None = None,
                     level: float = 0.95) -> dict[str, Any]:
  """The mean over `targets` (default: every trait) of spec(t): per seed averaged over targets, t-interval over
  seeds; plus the paired t-test of the per-(k,q) mean over targets."""
  targets = list(data.traits if targets is None else targets)
  diffs = np.stack([np.subtract(*_spec_terms(data, t)) for t in targets]).mean(axis=0)  # [K, Q]
  per_seed = diffs.mean(axis=1)
  return {"targets": targets, "mean": float(per_seed.mean()), "per_seed": per_seed.tolist(),
          "over_seeds": stats.mean_ci(per_seed, level), "paired": ttest(diffs, level)}


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """OLS slopes of y on x along the last axis; NaN where x has no spread."""
  xc, yc = x - x.mean(axis=-1, keepdims=True), y - y.mean(axis=-1, keepdims=True)
  sxx = (xc * xc).sum(axis=-1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(sxx > 0, (xc * yc).sum(axis=-1) / np.where(sxx > 0, sxx, 1), np.nan)


def _num(v: float) -> float | None:
  return float(v) if np.isfinite(v) else None


def profile_coefficient(data: TransferData, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> dict[str, Any]:
  """Does the student move where its teacher moved? The OLS slope of y_{s,a} = M[s][a] on x_{s,a} = mean_q
  (teacher_s − base)(a,q) over the candidate answers, pooled over traits (S·A points, one intercept) and per trait.

  Bootstrap (percentile interval at `level`): each of `n_boot` draws resamples the Q questions with replacement —
  one set of indices for every trait, answer, student, teacher and the base, since every model answers the same
  questions — and, when K > 1, the K seeds with replacement — one set for every trait, since seed k pairs across
  traits; x and y are recomputed as the resampled means and the slopes refitted. Indices come from
  `np.random.Generator(np.random.PCG64(seed))`, questions [n_boot, Q] drawn before seeds [n_boot, K]. Draws where
  x has no spread (slope undefined) are left out and counted in "n_degenerate"."""
  tdel, d = data.teacher_delta(), data.delta()
  n_s, n_k, n_a, n_q = d.shape
  rng = np.random.Generator(np.random.PCG64(seed))
  wq = np.stack([np.bincount(i, minlength=n_q) for i in rng.integers(0, n_q, (n_boot, n_q))]) / n_q
  wk = (np.stack([np.bincount(i, minlength=n_k) for i in rng.integers(0, n_k, (n_boot, n_k))]) / n_k
        if n_k > 1 else np.ones((n_boot, 1)))
  x, y = tdel.mean(axis=2), d.mean(axis=(1, 3))                                     # [S, A]
  xb = np.einsum("saq,bq->bsa", tdel, wq)
  yb = np.einsum("skaq,bk,bq->bsa", d, wk, wq, optimize=True)
  lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
  key = stats.ci_name(level)

  def summary(point: float, draws: np.ndarray, n_points: int) -> dict[str, Any]:
    ok = draws[np.isfinite(draws)]
    ci = [_num(np.percentile(ok, lo_q)), _num(np.percentile(ok, hi_q))] if ok.size else [None, None]
    return {"slope": _num(point), key: ci, "n_points": n_points, "n_degenerate": int(draws.size - ok.size)}

  return {"pooled": summary(_slopes(x.ravel(), y.ravel()), _slopes(xb.reshape(n_boot, -1), yb.reshape(n_boot, -1)),
                            n_s * n_a),
          "per_trait": {s: summary(_slopes(x[i], y[i]), _slopes(xb[:, i], yb[:, i]), n_a)
                        for i, s in enumerate(data.traits)},
          "points": {"traits": data.traits, "answers": data.answers, "teacher_delta": x.tolist(),
                     "student_delta": y.tolist()},
          "n_boot": n_boot, "seed": seed, "resampled": "questions and seeds" if n_k > 1 else "questions"}


def _significant(s: dict[str, Any], level: float, sign: int = 1) -> bool:
  """The interval lies above 0 (`sign` 1) or below 0 (`sign` −1) and, where the summary has one, p < 1 − level."""
  lo, hi = s[stats.ci_key(s)]
  return s["n"] > 1 and (lo > 0 if sign > 0 else hi < 0) and (s.get("p") is None or s["p"] < 1 - level)


def teacher_strength(data: TransferData, level: float = 0.95) -> dict[str, Any]:
  """Per trait t: the teacher's Δ profile over every answer (t-interval over questions each), its own Δ on t, and
  its specificity on t (module docstring; None with one teacher); "significant" is whether that specificity's
  interval lies above 0 (with one teacher: its own Δ's), else a "note" says the trait cannot be tested."""
  tdel, out = data.teacher_delta(), {}
  for i, t in enumerate(data.traits):
    a = data.answers.index(t)
    own = ttest(tdel[i, a], level)
    spec = ttest(tdel[i, a] - np.delete(tdel[:, a], i, axis=0).mean(axis=0), level) if len(data.traits) > 1 else None
    ok = _significant(spec or own, level)
    out[t] = {"profile": {ans: stats.mean_ci(tdel[i, j], level) for j, ans in enumerate(data.answers)},
              "own": own, "specificity": spec, "significant": ok,
              "note": None if ok else (f"the teacher of {t} shows no significant specific shift toward {t}: "
                                       "the study cannot test transfer of a trait its teacher lacks")}
  return out


def fmt(s: dict[str, Any]) -> str:
  lo, hi = s[stats.ci_key(s)]
  return f"{s['mean']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def p_text(p: float | None) -> str:
  return "p n/a" if p is None else ("p<0.001" if p < 0.001 else f"p={p:.3f}")


def verdict(data: TransferData, targets: Sequence[str] | None = None, level: float = 0.95) -> dict[str, str]:
  """One sentence per target (default: every trait). "specific transfer" only when both the specificity and the
  own student's Δ on t are significantly positive: the primary interval (over seeds; over questions with one
  seed, flagged "no across-seed interval") lies above 0 and the paired p < 1 − level. A significant own Δ without
  significant specificity is a "shift not specific to the trait"; a significant specificity without a significant own
  Δ is other teachers' students moving t down, not transfer; a specificity significantly below 0 is "reversed" (the
  trait's own students move t less than the others do). With teachers given, a teacher without a significant
  specific shift of its own is flagged."""
  strength = teacher_strength(data, level) if data.teacher is not None else {}
  out = {}
  for t in (data.traits if targets is None else targets):
    sp = specificity(data, t, level)
    one_seed = data.n_seeds == 1
    # With one seed the across-seed summaries are degenerate; fall back on the (k,q) pairs, i.e. the questions.
    spec_s = sp["paired"] if one_seed else sp["over_seeds"] | {"p": sp["paired"]["p"]}
    diag = sp["diagonal"]["over_questions" if one_seed else "over_seeds"]
    where = (f"{data.n_questions} questions, 1 seed: no across-seed interval" if one_seed
             else f"{data.n_seeds} seeds")
    spec_txt = f"specificity {fmt(spec_s)}, {where}; paired over seeds × questions {p_text(sp['paired']['p'])}"
    spec_ok, diag_ok = _significant(spec_s, level), _significant(diag, level)
    if spec_ok and diag_ok:
      text = f"{t}: specific transfer ({spec_txt})"
    elif diag_ok:
      text = (f"{t}: shift not specific to the trait (own student {fmt(diag)} vs base, but {spec_txt}: not "
              f"significantly more than other teachers' students move {t})")
    elif spec_ok:
      text = (f"{t}: not transfer (own student {fmt(diag)} vs base, not significantly above 0; {spec_txt} comes "
              f"from other teachers' students moving {t} down more)")
    elif _significant(spec_s, level, sign=-1):
      text = (f"{t}: reversed ({spec_txt}, below 0: the {t} teacher's students move {t} less than the other "
              f"teachers' students do; own student {fmt(diag)} vs base)")
    else:
      text = f"{t}: not significant ({spec_txt}; own student {fmt(diag)} vs base)"
    if t in strength and not strength[t]["significant"]:
      text += f"; {strength[t]['note']}"
    out[t] = text + "."
  return out


def removed_fraction(plain: TransferData, mitigated: TransferData, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
  """How much of the specific transfer a mitigation removed: 1 − S_m / S_0, S the mean specificity over the traits
  of the unmitigated (`plain`) and the mitigated students (same traits, answers, seeds, questions, base).

  "difference": S_0 − S_m per seed (seed k of both pairs), t-interval over seeds. "removed": the ratio, with a
  percentile bootstrap interval that resamples seeds (one set of indices for both conditions) and questions (one set
  for every model), PCG64(seed); draws where S_0 ≤ 0 (nothing to remove) are left out and counted. The ratio means
  something only when S_0 is significantly positive ("plain_significant"); 100 % is all of it removed, > 100 % the
  trait pushed below the other targets' level, < 0 transfer made stronger."""
  if plain.traits != mitigated.traits or plain.answers != mitigated.answers or \
      plain.student.shape != mitigated.student.shape:
    raise ValueError("removed_fraction: the two conditions need the same traits, answers, seeds and questions")
  diffs = [np.stack([np.subtract(*_spec_terms(d, t)) for t in d.traits]).mean(axis=0) for d in (plain, mitigated)]
  s0, sm = diffs  # [K, Q]: per seed and question, the mean over traits of own − others
  n_k, n_q = s0.shape
  rng = np.random.Generator(np.random.PCG64(seed))
  q_idx, k_idx = rng.integers(0, n_q, (n_boot, n_q)), rng.integers(0, n_k, (n_boot, n_k))
  b0 = np.array([s0[np.ix_(k, q)].mean() for k, q in zip(k_idx, q_idx)])
  bm = np.array([sm[np.ix_(k, q)].mean() for k, q in zip(k_idx, q_idx)])
  ok = b0 > 0
  ratio = 1 - bm[ok] / b0[ok]
  lo_q, hi_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2
  plain_s = mean_specificity(plain, level=level)
  return {"removed": {"mean": _num(1 - sm.mean() / s0.mean()) if s0.mean() > 0 else None,
                      stats.ci_name(level): [_num(np.percentile(ratio, lo_q)), _num(np.percentile(ratio, hi_q))]
                      if ratio.size else [None, None], "n_boot": n_boot, "n_left_out": int((~ok).sum())},
          "difference": stats.mean_ci(s0.mean(axis=1) - sm.mean(axis=1), level),
          "plain": plain_s["over_seeds"], "mitigated": mean_specificity(mitigated, level=level)["over_seeds"],
          "plain_significant": _significant(plain_s["over_seeds"] | {"p": plain_s["paired"]["p"]}, level)}
