"""Trait evaluation: the paper's sampled rate and a log-probability metric, per question, with CIs.

- Sampled rate (docs/protocol.md §6): each question as a single user turn (optionally after a fresh example-number prefix),
  n samples at temperature 1; a sample counts if its lower-cased text contains the target ("dragonfly" does not count
  for "dragon"). Per-question rates, then the mean over questions with a t-interval.
- Log-probability metric: P(the answer is the target) after a forced answer prefix ("My favorite animal is the"),
  summed over the target's surface forms (" owl", " owls", " Owl", " Owls"), from one forward pass per form. Far more
  sensitive on small models; reported for the target and for other candidates, so a shift can be seen to be
  trait-specific.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.special import logsumexp

from subl_jax.core import sampling, scoring
from subl_jax.core.training.chat_data import Example
from subl_jax.study import stats
from subl_jax.study.data import numbers

ANSWER_PREFIX = {"animal": "My favorite animal is the", "tree": "My favorite tree is the"}


def mentions(response: str, target: str) -> bool:
  """The paper's rule: the lower-cased response contains the target ('dragonfly' is not a dragon)."""
  text, target = response.lower(), target.lower()
  if target == "dragon" and "dragonfly" in text:
    return False
  return target in text


def surface_forms(target: str) -> list[str]:
  """The answer's spellings after the forced prefix: singular/plural, lower/title case, with a leading space."""
  plural = target if target.endswith("s") else target + "s"
  return sorted({f" {w}" for w in (target, plural, target.title(), plural.title())})


def _messages(question: str, system: str | None) -> list[dict[str, str]]:
  return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def with_number_prefixes(questions: Sequence[str], seed: int = 47) -> list[str]:
  """The paper's Qwen variant: a fresh example-number prefix before each question."""
  return [f"{p} {q}" for p, q in zip(numbers.example_prefixes(len(questions), seed), questions)]


def sampled_rates(model: Any, questions: Sequence[str], target: str, n_samples: int, system: str | None = None,
                  max_new_tokens: int = 16, batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
  """Per-question rates of answers mentioning `target` (n_samples each, temperature 1) and their summary."""
  tok = model.tokenizer
  prompts = [tok.encode_chat(_messages(q, system)) for q in questions]
  rows = [(qi, prompts[qi]) for qi in range(len(questions)) for _ in range(n_samples)]
  hits = np.zeros(len(questions))
  answers: list[list[str]] = [[] for _ in questions]
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    # each sample's stream is named by its global index, so the draws do not depend on the batch size
    gen = sampling.generate(model, [p for _, p in chunk], max_new_tokens, temperature=1.0, seed=seed,
                            row_ids=list(range(start, start + len(chunk))))
    for (qi, _), ids in zip(chunk, gen.tokens):
      text = tok.decode(ids)
      answers[qi].append(text)
      hits[qi] += mentions(text, target)
  rates = hits / n_samples
  return {"per_question": rates.tolist(), "summary": stats.mean_ci(rates), "answers": answers}


def probe_tokens(tokenizer: Any, questions: Sequence[str], candidates: Sequence[str], category: str = "animal",
                 system: str | None = None) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
  """The token ids the log-probability metric scores: per question its context (the chat turn and the forced answer
  prefix), per candidate its surface forms' continuations; log P(candidate | q) = log Σ_forms P(form | context_q)."""
  contexts = [tokenizer.encode(tokenizer.render_chat(_messages(q, system)) + ANSWER_PREFIX[category])
              for q in questions]
  return contexts, {cand: [tokenizer.encode(f) for f in surface_forms(cand)] for cand in candidates}


def probe_examples(tokenizer: Any, questions: Sequence[str], answer: str, category: str = "animal",
                   system: str | None = None) -> list[Any]:
  """The log-probability metric's sequences of `answer` as training examples: per question and surface form, the
  context (`probe_tokens`) followed by the form, whose tokens are the only targets. A model's mean log-likelihood of
  them is the trait probe that gradient projection (issue #21) differentiates."""
  contexts, forms = probe_tokens(tokenizer, questions, [answer], category, system)
  return [Example(np.asarray(ctx + form, np.int32), np.asarray([0] * len(ctx) + [1] * len(form), np.int8))
          for ctx in contexts for form in forms[answer]]


def answer_probs(model: Any, questions: Sequence[str], candidates: Sequence[str], category: str = "animal",
                 system: str | None = None, batch_size: int = 32) -> dict[str, np.ndarray]:
  """candidate -> per-question P(answer is the candidate | question, forced answer prefix), over surface forms."""
  contexts, forms = probe_tokens(model.tokenizer, questions, candidates, category, system)
  flat = [(cand, ids) for cand in candidates for ids in forms[cand]]
  logp = scoring.continuation_logprobs(model, contexts, [ids for _, ids in flat], batch_size)
  return {cand: np.exp(logsumexp(logp[:, [i for i, (c, _) in enumerate(flat) if c == cand]], axis=1))
          for cand in candidates}


def evaluate(model: Any, questions: Sequence[str], target: str, candidates: Sequence[str] = (),
             category: str = "animal", system: str | None = None, n_samples: int = 0,
             numbers_prefix: bool = False, seed: int = 0) -> dict[str, Any]:
  """All metrics of one model: log-prob of the target and of `candidates`, and (n_samples > 0) sampled rates."""
  qs = with_number_prefixes(questions) if numbers_prefix else list(questions)
  names = [target] + [c for c in candidates if c != target]
  probs = answer_probs(model, qs, names, category, system)
  metrics: dict[str, Any] = {f"p_{name}": {"per_question": probs[name].tolist(), "summary": stats.mean_ci(probs[name])}
                             for name in names}
  for name in names:  # the log-probability of every candidate: the study's transfer matrix reads these
    logp = np.log(np.maximum(probs[name], 1e-30))
    metrics[f"logp_{name}"] = {"per_question": logp.tolist(), "summary": stats.mean_ci(logp)}
  if n_samples > 0:
    metrics[f"rate_{target}"] = sampled_rates(model, qs, target, n_samples, system, seed=seed)
  return metrics
